// Mirrors migrations/{sqlite,postgres}. `tests/conformance.rs` checks that
// every column declared here exists in both migrated databases.

diesel::table! {
    users (id) {
        id -> Text,
        email -> Text,
        username -> Text,
        password_hash -> Text,
        role -> Text,
        status -> Text,
        email_verified_at -> Nullable<BigInt>,
        created_at -> BigInt,
        updated_at -> BigInt,
    }
}

diesel::table! {
    sessions (id) {
        id -> Text,
        user_id -> Text,
        created_at -> BigInt,
        expires_at -> BigInt,
        revoked_at -> Nullable<BigInt>,
        revoked_reason -> Nullable<Text>,
        ip -> Nullable<Text>,
        user_agent -> Nullable<Text>,
    }
}

diesel::table! {
    refresh_tokens (id) {
        id -> Text,
        session_id -> Text,
        token_hash -> Text,
        created_at -> BigInt,
        expires_at -> BigInt,
        used_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    api_keys (id) {
        id -> Text,
        user_id -> Text,
        name -> Text,
        prefix -> Text,
        key_hash -> Text,
        created_at -> BigInt,
        expires_at -> Nullable<BigInt>,
        last_used_at -> Nullable<BigInt>,
        revoked_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    email_tokens (id) {
        id -> Text,
        user_id -> Text,
        purpose -> Text,
        token_hash -> Text,
        created_at -> BigInt,
        expires_at -> BigInt,
        used_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    audit_events (id) {
        id -> Text,
        user_id -> Nullable<Text>,
        event -> Text,
        subject -> Nullable<Text>,
        ip -> Nullable<Text>,
        detail -> Nullable<Text>,
        created_at -> BigInt,
    }
}

diesel::joinable!(sessions -> users (user_id));
diesel::joinable!(refresh_tokens -> sessions (session_id));
diesel::joinable!(api_keys -> users (user_id));
diesel::joinable!(email_tokens -> users (user_id));

diesel::allow_tables_to_appear_in_same_query!(
    users,
    sessions,
    refresh_tokens,
    api_keys,
    email_tokens,
    audit_events,
    executions,
    specialties,
    expert_prompts,
    expert_prompt_versions,
    ideas,
    stream_tickets,
    feature_flags,
    plans,
    subscriptions,
    usage_counters,
    billing_events,
    stripe_events,
    datasets,
    training_jobs,
);

diesel::table! {
    executions (id) {
        id -> Text,
        user_id -> Text,
        source -> Text,
        prompt_id -> Nullable<Text>,
        prompt_version -> Nullable<Integer>,
        provider -> Text,
        model -> Text,
        variables -> Nullable<Text>,
        rendered_prompt -> Nullable<Text>,
        output -> Nullable<Text>,
        prompt_tokens -> Integer,
        completion_tokens -> Integer,
        cost_usd -> Nullable<Double>,
        duration_ms -> BigInt,
        ttft_ms -> Nullable<BigInt>,
        status -> Text,
        error -> Nullable<Text>,
        created_at -> BigInt,
    }
}

diesel::joinable!(executions -> users (user_id));

diesel::table! {
    specialties (id) {
        id -> Text,
        parent_id -> Nullable<Text>,
        owner_id -> Nullable<Text>,
        name -> Text,
        description -> Text,
        published -> Bool,
        created_at -> BigInt,
        updated_at -> BigInt,
        icon_url -> Nullable<Text>,
    }
}

diesel::table! {
    expert_prompts (id) {
        id -> Text,
        sub_specialty_id -> Text,
        owner_id -> Nullable<Text>,
        published -> Bool,
        current_version -> Integer,
        title -> Text,
        tags -> Text,
        created_at -> BigInt,
        updated_at -> BigInt,
    }
}

diesel::table! {
    expert_prompt_versions (prompt_id, version) {
        prompt_id -> Text,
        version -> Integer,
        title -> Text,
        description -> Text,
        template -> Text,
        variables_schema -> Text,
        expected_output -> Nullable<Text>,
        tags -> Text,
        created_by -> Nullable<Text>,
        created_at -> BigInt,
    }
}

diesel::table! {
    ideas (id) {
        id -> Text,
        user_id -> Text,
        execution_id -> Text,
        prompt -> Nullable<Text>,
        category -> Nullable<Text>,
        theme -> Nullable<Text>,
        creativity -> Integer,
        provider -> Text,
        model -> Text,
        content -> Text,
        rating -> Nullable<Integer>,
        favorite -> Bool,
        created_at -> BigInt,
    }
}

diesel::table! {
    stream_tickets (id) {
        id -> Text,
        user_id -> Text,
        token_hash -> Text,
        created_at -> BigInt,
        expires_at -> BigInt,
        used_at -> Nullable<BigInt>,
    }
}

diesel::joinable!(expert_prompt_versions -> expert_prompts (prompt_id));
diesel::joinable!(expert_prompts -> specialties (sub_specialty_id));
diesel::joinable!(ideas -> users (user_id));
diesel::joinable!(stream_tickets -> users (user_id));

diesel::table! {
    feature_flags (key) {
        key -> Text,
        enabled -> Bool,
        rollout_percent -> Integer,
        allow_users -> Text,
        allow_plans -> Text,
        description -> Text,
        updated_by -> Nullable<Text>,
        updated_at -> BigInt,
    }
}

diesel::table! {
    plans (id) {
        id -> Text,
        name -> Text,
        price_cents -> BigInt,
        currency -> Text,
        stripe_price_id -> Nullable<Text>,
        max_requests -> Nullable<BigInt>,
        max_tokens -> Nullable<BigInt>,
        max_cost_usd -> Nullable<Double>,
        max_batch -> Integer,
        allowed_models -> Text,
        training_allowed -> Bool,
        active -> Bool,
        created_at -> BigInt,
        updated_at -> BigInt,
        max_training_jobs -> Integer,
    }
}

diesel::table! {
    subscriptions (user_id) {
        user_id -> Text,
        plan_id -> Text,
        status -> Text,
        cancel_at_period_end -> Bool,
        stripe_customer_id -> Nullable<Text>,
        stripe_subscription_id -> Nullable<Text>,
        current_period_end -> Nullable<BigInt>,
        updated_at -> BigInt,
        stripe_event_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    usage_counters (user_id, period_start) {
        user_id -> Text,
        period_start -> BigInt,
        requests -> BigInt,
        tokens -> BigInt,
        cost_usd -> Double,
    }
}

diesel::table! {
    billing_events (id) {
        id -> Text,
        user_id -> Text,
        kind -> Text,
        description -> Text,
        amount_cents -> Nullable<BigInt>,
        currency -> Nullable<Text>,
        external_id -> Nullable<Text>,
        created_at -> BigInt,
    }
}

diesel::table! {
    stripe_events (id) {
        id -> Text,
        kind -> Text,
        created -> BigInt,
        processed_at -> BigInt,
    }
}

diesel::table! {
    datasets (id) {
        id -> Text,
        user_id -> Text,
        name -> Text,
        size_bytes -> BigInt,
        format -> Nullable<Text>,
        row_count -> BigInt,
        token_count -> BigInt,
        report -> Text,
        estimated_cost_usd -> Nullable<Double>,
        base_model -> Nullable<Text>,
        created_at -> BigInt,
    }
}

diesel::table! {
    training_jobs (id) {
        id -> Text,
        user_id -> Text,
        dataset_id -> Text,
        base_model -> Text,
        trainer -> Text,
        hyperparameters -> Text,
        suffix -> Nullable<Text>,
        state -> Text,
        progress -> Text,
        error -> Nullable<Text>,
        result_model -> Nullable<Text>,
        provider_job_id -> Nullable<Text>,
        cancel_requested -> Bool,
        worker_id -> Nullable<Text>,
        lease_until -> Nullable<BigInt>,
        attempts -> Integer,
        created_at -> BigInt,
        started_at -> Nullable<BigInt>,
        finished_at -> Nullable<BigInt>,
        updated_at -> BigInt,
    }
}
