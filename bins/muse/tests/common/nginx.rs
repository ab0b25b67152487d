//! nginx as shipped: `deploy/nginx/muse.conf` itself, with its upstream
//! servers replaced by loopback ports and its `listen` by a loopback port,
//! run with its own prefix (pid, logs, temp files in `dir`). Used by the
//! replicas test and by the gateway bench (included with `#[path]`, so it
//! needs only std).

use std::path::Path;
use std::process::{Child, Command, Stdio};

/// The shipped configuration for these replica ports, listening on
/// 127.0.0.1:`listen`.
pub fn render(shipped: &str, listen: u16, ports: &[u16]) -> String {
    let mut out = String::new();
    let mut servers_written = false;
    for line in shipped.lines() {
        let t = line.trim_start();
        if let Some(rest) = t.strip_prefix("server ").filter(|r| !r.starts_with('{')) {
            // `server ADDRESS PARAMS;` inside the upstream block: the
            // shipped parameters, our addresses.
            if !servers_written {
                let params = rest.split_once(' ').map_or(";", |(_, p)| p);
                for p in ports {
                    out.push_str(&format!("    server 127.0.0.1:{p} {params}\n"));
                }
                servers_written = true;
            }
            continue;
        }
        if t.starts_with("listen ") {
            out.push_str(&format!("    listen 127.0.0.1:{listen};\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    assert!(
        servers_written,
        "no upstream servers in the shipped nginx config"
    );
    out
}

/// A running nginx, stopped when dropped: SIGTERM to the master, which
/// stops its workers (SIGKILL would leave them running), then SIGKILL if it
/// has not exited within 5 s.
pub struct Nginx(Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts nginx (in the foreground, as a child) with the shipped
/// configuration in front of `ports`.
pub fn start(dir: &Path, listen: u16, ports: &[u16]) -> Nginx {
    // From bins/muse (the tests) or tests/ (the bench).
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let shipped = [manifest.join("../../deploy"), manifest.join("../deploy")]
        .iter()
        .find_map(|d| std::fs::read_to_string(d.join("nginx/muse.conf")).ok())
        .expect("deploy/nginx/muse.conf");
    std::fs::write(dir.join("muse.conf"), render(&shipped, listen, ports)).unwrap();
    let d = dir.display();
    let main = format!(
        "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\ndaemon off;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n    access_log off;\n    client_body_temp_path {d}/body;\n    proxy_temp_path {d}/proxy;\n    \
         fastcgi_temp_path {d}/fastcgi;\n    uwsgi_temp_path {d}/uwsgi;\n    scgi_temp_path {d}/scgi;\n    \
         include {d}/muse.conf;\n}}\n"
    );
    std::fs::write(dir.join("nginx.conf"), main).unwrap();
    Command::new("nginx")
        .args([
            "-p",
            dir.to_str().unwrap(),
            "-c",
            dir.join("nginx.conf").to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(Nginx)
        .unwrap()
}
