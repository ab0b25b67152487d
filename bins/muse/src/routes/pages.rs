//! Two small HTML pages behind the emailed links, so a user can verify an
//! email or choose a new password with nothing but a browser. They read the
//! token from the URL in the browser (it is never echoed by the server) and
//! call the JSON API.

use actix_web::{web, HttpResponse};

pub fn config(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/reset-password").get(reset_password_page))
        .service(web::resource("/verify-email").get(verify_email_page));
}

const STYLE: &str =
    "body{font-family:system-ui,sans-serif;max-width:28rem;margin:4rem auto;padding:0 1rem}\
input,button{font:inherit;padding:.5rem;width:100%;box-sizing:border-box;margin:.25rem 0}\
#out{margin-top:1rem;white-space:pre-wrap}";

fn page(title: &str, body: &str, script: &str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header(("content-security-policy", "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; connect-src 'self'; form-action 'none'; base-uri 'none'"))
        .insert_header(("referrer-policy", "no-referrer"))
        .insert_header(("cache-control", "no-store"))
        .body(format!(
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width\">\
             <title>{title} · Muse</title><style>{STYLE}</style></head><body><h1>{title}</h1>{body}<p id=\"out\"></p>\
             <script>const token=new URLSearchParams(location.search).get('token')||'';\
             const out=document.getElementById('out');\
             async function call(url,body){{const r=await fetch(url,{{method:'POST',headers:{{'content-type':'application/json'}},body:body?JSON.stringify(body):null}});\
             const j=await r.json().catch(()=>({{}}));out.textContent=r.ok?(j.message||'done'):((j.error&&j.error.message)||('error '+r.status));return r.ok;}}\
             {script}</script></body></html>"
        ))
}

async fn reset_password_page() -> HttpResponse {
    page(
        "Choose a new password",
        "<form id=\"f\"><label>New password (8 to 128 characters)<input id=\"p\" type=\"password\" minlength=\"8\" maxlength=\"128\" required autocomplete=\"new-password\"></label>\
         <button>Set password</button></form>",
        "document.getElementById('f').addEventListener('submit',async e=>{e.preventDefault();\
         if(await call('/api/v1/auth/reset-password',{token,new_password:document.getElementById('p').value}))e.target.remove();});",
    )
}

async fn verify_email_page() -> HttpResponse {
    page(
        "Confirm your email",
        "<button id=\"b\">Confirm my email address</button>",
        "document.getElementById('b').addEventListener('click',async e=>{\
         if(await call('/api/v1/auth/verify-email/'+encodeURIComponent(token)))e.target.remove();});",
    )
}
