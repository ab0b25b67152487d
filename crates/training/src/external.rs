//! [`ExternalTrainer`]: runs a training program the operator installs
//! (PyTorch, transformers, a GPU box behind ssh, …) and speaks a small
//! protocol with it (docs/training.md):
//!
//! ```text
//! <command…> --dataset PATH --format chat|prompt_completion
//!            --base-model=MODEL [--base-model-dir DIR]
//!            --output-dir DIR --hyperparameters JSON
//! ```
//!
//! - stdout: one JSON object per line — `{"type": "progress", "step",
//!   "total_steps", "epoch", "metrics": {…}, "message"}`, `{"type": "log",
//!   "message"}`, `{"type": "model", "dir"}` (the ONNX model directory,
//!   inside the output directory; `DIR/model` when not said). Other lines
//!   go to the job log.
//! - stderr goes to the job log; its last lines are the error of a failed run.
//! - exit status 0 is success.
//! - stdin stays open and closes when Muse goes away: stop then.
//!
//! Stop and the time limit send SIGTERM to the program's process group,
//! then SIGKILL after a grace period.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};

use crate::job::Progress;
use crate::trainer::*;

/// Lines of stderr kept for the error message of a failed run.
const STDERR_TAIL: usize = 20;

#[derive(Debug, Clone)]
pub struct ExternalConfig {
    /// The program and its first arguments (`["python3", "train.py"]`).
    pub command: Vec<String>,
    /// Longest run; then SIGTERM, then SIGKILL.
    pub time_limit: Duration,
    /// Between SIGTERM and SIGKILL.
    pub grace: Duration,
}

pub struct ExternalTrainer {
    config: ExternalConfig,
}

impl ExternalTrainer {
    pub fn new(config: ExternalConfig) -> Result<Self, String> {
        if config.command.is_empty() {
            return Err("the training command is empty".into());
        }
        Ok(Self { config })
    }
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Line {
    Progress {
        step: Option<u64>,
        total_steps: Option<u64>,
        epoch: Option<f64>,
        #[serde(default)]
        metrics: Map<String, Value>,
        message: Option<String>,
    },
    Log {
        message: String,
    },
    Model {
        dir: String,
    },
}

/// The model's name in the registry: `trained/<suffix>-<8 hex of the job>`.
pub fn local_model_name(job_id: uuid::Uuid, suffix: Option<&str>) -> String {
    let hex = job_id.simple().to_string();
    let tail = &hex[hex.len() - 8..];
    match suffix {
        Some(s) if !s.is_empty() => format!("trained/{s}-{tail}"),
        _ => format!("trained/model-{tail}"),
    }
}

/// Appends lines to the job log; a log that cannot be written is not a
/// reason to fail the job.
struct Log(Option<tokio::fs::File>);

impl Log {
    async fn open(path: &Path) -> Self {
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await;
        if let Err(e) = &file {
            tracing::warn!(path = %path.display(), error = %e, "cannot open the job log");
        }
        Self(file.ok())
    }

    async fn line(&mut self, prefix: &str, text: &str) {
        if let Some(f) = &mut self.0 {
            let _ = f.write_all(format!("{prefix}{text}\n").as_bytes()).await;
        }
    }
}

fn signal_group(child: &Child, signal: nix::sys::signal::Signal) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        // The program leads its own process group: its children go too.
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), signal);
    }
}

/// SIGTERM, then SIGKILL after `grace`; waits for the exit.
async fn terminate(child: &mut Child, grace: Duration) {
    signal_group(child, nix::sys::signal::Signal::SIGTERM);
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        signal_group(child, nix::sys::signal::Signal::SIGKILL);
        let _ = child.kill().await;
    }
}

fn inside(dir: &Path, root: &Path) -> bool {
    match (dir.canonicalize(), root.canonicalize()) {
        (Ok(d), Ok(r)) => d.starts_with(r),
        _ => false,
    }
}

#[async_trait]
impl Trainer for ExternalTrainer {
    fn id(&self) -> &str {
        "external"
    }

    fn description(&self) -> String {
        "the operator's training program (progress as JSON lines on stdout); the result is served as a local ONNX model".into()
    }

    fn parameters(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec {
                name: "n_epochs",
                kind: "integer",
                min: Some(1.0),
                max: Some(100.0),
                description: "passes over the dataset",
            },
            ParamSpec {
                name: "learning_rate",
                kind: "number",
                min: Some(0.0),
                max: Some(1.0),
                description: "step size",
            },
            ParamSpec {
                name: "batch_size",
                kind: "integer",
                min: Some(1.0),
                max: Some(1024.0),
                description: "rows per step",
            },
            ParamSpec {
                name: "max_steps",
                kind: "integer",
                min: Some(1.0),
                max: Some(1_000_000.0),
                description: "stop after this many steps",
            },
            ParamSpec {
                name: "seed",
                kind: "integer",
                min: Some(0.0),
                max: Some(4_294_967_295.0),
                description: "random seed",
            },
        ]
    }

    fn validate(
        &self,
        base_model: &str,
        hyperparameters: &Value,
    ) -> Result<Value, Vec<ParamIssue>> {
        let mut issues = Vec::new();
        // It reaches the program's command line: no option look-alikes.
        if base_model.is_empty()
            || base_model.len() > 200
            || base_model.starts_with('-')
            || !base_model
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./:@".contains(c))
        {
            issues.push(ParamIssue::new(
                "base_model",
                "1 to 200 of letters, digits and - _ . / : @, not starting with -",
            ));
        }
        let out = check_params(hyperparameters, &self.parameters(), &mut issues);
        if issues.is_empty() {
            Ok(Value::Object(out))
        } else {
            Err(issues)
        }
    }

    fn can_resume(&self) -> bool {
        false
    }

    fn price_per_million_tokens(&self, _base_model: &str) -> Option<f64> {
        None
    }

    fn epochs(&self, hyperparameters: &Value) -> u64 {
        hyperparameters["n_epochs"].as_u64().unwrap_or(1)
    }

    async fn train(
        &self,
        request: TrainRequest,
        events: mpsc::Sender<TrainerEvent>,
        mut cancel: watch::Receiver<bool>,
    ) -> Result<TrainedModel, TrainError> {
        tokio::fs::create_dir_all(&request.output_dir)
            .await
            .map_err(|e| TrainError::Trainer(format!("cannot create the output directory: {e}")))?;
        let mut log = Log::open(&request.log_path).await;
        let (program, args) = self
            .config
            .command
            .split_first()
            .ok_or_else(|| TrainError::Trainer("the training command is empty".into()))?;
        let mut child = Command::new(program)
            .args(args)
            .arg("--dataset")
            .arg(&request.dataset_path)
            .args(["--format", request.format.as_str()])
            .arg(format!("--base-model={}", request.base_model))
            .args(
                request
                    .base_model_dir
                    .iter()
                    .flat_map(|d| [std::ffi::OsStr::new("--base-model-dir"), d.as_os_str()]),
            )
            .arg("--output-dir")
            .arg(&request.output_dir)
            .arg("--hyperparameters")
            .arg(request.hyperparameters.to_string())
            .env("MUSE_JOB_ID", request.job_id.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| TrainError::Trainer(format!("cannot start {program}: {e}")))?;
        log.line(
            "muse: ",
            &format!("started {program} (pid {})", child.id().unwrap_or(0)),
        )
        .await;
        // Kept open until the run ends: EOF tells the program Muse is gone.
        let _stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let (log_tx, mut log_rx) = mpsc::channel::<(&'static str, String)>(256);
        let out_task = {
            let log_tx = log_tx.clone();
            tokio::spawn(async move {
                let mut model_dir: Option<String> = None;
                let Some(stdout) = stdout else {
                    return model_dir;
                };
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    match serde_json::from_str::<Line>(&line) {
                        Ok(Line::Progress {
                            step,
                            total_steps,
                            epoch,
                            metrics,
                            message,
                        }) => {
                            let _ = events.try_send(TrainerEvent::Progress(Progress {
                                step,
                                total_steps,
                                epoch,
                                metrics,
                                message,
                            }));
                        }
                        Ok(Line::Log { message }) => {
                            let _ = log_tx.send(("", message)).await;
                        }
                        Ok(Line::Model { dir }) => model_dir = Some(dir),
                        Err(_) => {
                            let _ = log_tx.send(("stdout: ", line)).await;
                        }
                    }
                }
                model_dir
            })
        };
        let err_task = tokio::spawn(async move {
            let mut tail: VecDeque<String> = VecDeque::new();
            let Some(stderr) = stderr else { return tail };
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if tail.len() == STDERR_TAIL {
                    tail.pop_front();
                }
                tail.push_back(line.clone());
                let _ = log_tx.send(("stderr: ", line)).await;
            }
            tail
        });
        let writer = tokio::spawn(async move {
            while let Some((prefix, line)) = log_rx.recv().await {
                log.line(prefix, &line).await;
            }
            log
        });

        let deadline = tokio::time::sleep(self.config.time_limit);
        tokio::pin!(deadline);
        let outcome = loop {
            tokio::select! {
                status = child.wait() => break Ok(status),
                changed = cancel.changed() => {
                    if changed.is_err() || *cancel.borrow() {
                        terminate(&mut child, self.config.grace).await;
                        break Err(TrainError::Cancelled);
                    }
                }
                () = &mut deadline => {
                    terminate(&mut child, self.config.grace).await;
                    break Err(TrainError::TimedOut(self.config.time_limit.as_secs()));
                }
            }
        };
        let model_dir = out_task.await.ok().flatten();
        let tail = err_task.await.unwrap_or_default();
        let mut log = writer.await.ok();
        let status = match outcome {
            Ok(Ok(status)) => status,
            Ok(Err(e)) => return Err(TrainError::Trainer(format!("waiting for the program: {e}"))),
            Err(e) => {
                if let Some(log) = &mut log {
                    log.line("muse: ", &format!("stopped: {e}")).await;
                }
                return Err(e);
            }
        };
        if let Some(log) = &mut log {
            log.line("muse: ", &format!("exited with {status}")).await;
        }
        if !status.success() {
            let tail: Vec<String> = tail.into_iter().collect();
            let detail = if tail.is_empty() {
                "no output on stderr".to_string()
            } else {
                tail.join("\n")
            };
            return Err(TrainError::Failed(format!(
                "the training program exited with {status}: {detail}"
            )));
        }
        let dir: PathBuf = match model_dir {
            Some(d) if Path::new(&d).is_absolute() => PathBuf::from(d),
            Some(d) => request.output_dir.join(d),
            None => request.output_dir.join("model"),
        };
        if !dir.is_dir() {
            return Err(TrainError::Failed(format!(
                "the program succeeded but produced no model directory at {}",
                dir.display()
            )));
        }
        if !inside(&dir, &request.output_dir) {
            return Err(TrainError::Failed(format!(
                "the model directory {} is not inside the output directory",
                dir.display()
            )));
        }
        if !dir.join("model.onnx").is_file() || !dir.join("tokenizer.json").is_file() {
            return Err(TrainError::Failed(format!(
                "the program succeeded but {} has no model.onnx and tokenizer.json",
                dir.display()
            )));
        }
        Ok(TrainedModel::Local {
            name: local_model_name(request.job_id, request.suffix.as_deref()),
            dir,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn trainer() -> ExternalTrainer {
        ExternalTrainer::new(ExternalConfig {
            command: vec!["true".into()],
            time_limit: Duration::from_secs(5),
            grace: Duration::from_secs(1),
        })
        .unwrap()
    }

    #[test]
    fn hyperparameters_are_checked_each() {
        let t = trainer();
        assert_eq!(
            t.validate("local/x", &json!({"n_epochs": 2, "learning_rate": 0.01}))
                .unwrap(),
            json!({"n_epochs": 2, "learning_rate": 0.01})
        );
        let issues = t
            .validate(
                "",
                &json!({"n_epochs": 0, "learning_rate": "fast", "dropout": 0.1}),
            )
            .unwrap_err();
        let fields: Vec<&str> = issues.iter().map(|i| i.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "base_model",
                "hyperparameters.dropout",
                "hyperparameters.n_epochs",
                "hyperparameters.learning_rate"
            ]
        );
        assert!(t.validate("m", &json!([1])).is_err());
        assert!(t.validate("--output-dir=/etc", &Value::Null).is_err());
        assert!(t.validate("local/org/name", &Value::Null).is_ok());
        assert_eq!(t.validate("m", &Value::Null).unwrap(), json!({}));
    }

    fn sh(script: &str, limit_ms: u64) -> ExternalTrainer {
        // `sh -c SCRIPT sh --dataset …`: Muse's arguments become $1…
        ExternalTrainer::new(ExternalConfig {
            command: vec!["sh".into(), "-c".into(), script.into(), "sh".into()],
            time_limit: Duration::from_millis(limit_ms),
            grace: Duration::from_millis(500),
        })
        .unwrap()
    }

    fn request(dir: &Path) -> TrainRequest {
        TrainRequest {
            job_id: uuid::Uuid::now_v7(),
            dataset_path: dir.join("d.jsonl"),
            format: crate::DatasetFormat::Chat,
            base_model: "local/x".into(),
            base_model_dir: None,
            hyperparameters: json!({}),
            suffix: None,
            output_dir: dir.join("out"),
            log_path: dir.join("job.log"),
            provider_job_id: None,
        }
    }

    async fn run(
        t: &ExternalTrainer,
        dir: &Path,
        cancel_after: Option<u64>,
    ) -> Result<TrainedModel, TrainError> {
        let (tx, mut rx) = mpsc::channel(64);
        let (ctx, crx) = watch::channel(false);
        tokio::spawn(async move { while rx.recv().await.is_some() {} });
        if let Some(ms) = cancel_after {
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                let _ = ctx.send(true);
            });
            t.train(request(dir), tx, crx).await
        } else {
            let r = t.train(request(dir), tx, crx).await;
            drop(ctx);
            r
        }
    }

    #[tokio::test]
    async fn the_time_limit_stops_the_program_with_sigterm() {
        let dir = tempfile::tempdir().unwrap();
        let t = sh(
            "trap 'echo got TERM >&2; exit 143' TERM; sleep 30 & wait",
            300,
        );
        let started = std::time::Instant::now();
        let r = run(&t, dir.path(), None).await;
        assert!(matches!(r, Err(TrainError::TimedOut(_))), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
        let log = std::fs::read_to_string(dir.path().join("job.log")).unwrap();
        assert!(log.contains("stderr: got TERM"), "{log}");
    }

    #[tokio::test]
    async fn a_program_that_ignores_sigterm_is_killed_and_a_stop_is_a_cancel() {
        let dir = tempfile::tempdir().unwrap();
        let t = sh("trap '' TERM; while true; do sleep 0.05; done", 60_000);
        let started = std::time::Instant::now();
        let r = run(&t, dir.path(), Some(200)).await;
        assert!(matches!(r, Err(TrainError::Cancelled)), "{r:?}");
        // 200 ms, then the 500 ms grace, then SIGKILL.
        assert!(
            started.elapsed() >= Duration::from_millis(650),
            "{:?}",
            started.elapsed()
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn success_needs_a_model_inside_the_output_directory() {
        let dir = tempfile::tempdir().unwrap();
        let r = run(&sh("exit 0", 5_000), dir.path(), None).await;
        assert!(
            matches!(&r, Err(TrainError::Failed(m)) if m.contains("no model directory")),
            "{r:?}"
        );
        let empty = sh(r#"mkdir -p "$7/model""#, 5_000);
        let r = run(&empty, dir.path(), None).await;
        assert!(
            matches!(&r, Err(TrainError::Failed(m)) if m.contains("no model.onnx")),
            "{r:?}"
        );
        let escape = sh(r#"echo '{"type": "model", "dir": "/"}'"#, 5_000);
        let r = run(&escape, dir.path(), None).await;
        assert!(
            matches!(&r, Err(TrainError::Failed(m)) if m.contains("not inside")),
            "{r:?}"
        );
        // $7 is the output directory (after --dataset P, --format F, --base-model=M).
        let ok = sh(
            r#"mkdir -p "$7/m" && touch "$7/m/model.onnx" "$7/m/tokenizer.json" && echo '{"type": "model", "dir": "m"}'"#,
            5_000,
        );
        match run(&ok, dir.path(), None).await {
            Ok(TrainedModel::Local { name, dir: d }) => {
                assert!(name.starts_with("trained/model-"));
                assert!(d.ends_with("out/m"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn model_names_use_the_suffix_and_the_job() {
        let id = uuid::Uuid::parse_str("01930000-0000-7000-8000-0000deadbeef").unwrap();
        assert_eq!(
            local_model_name(id, Some("poems")),
            "trained/poems-deadbeef"
        );
        assert_eq!(local_model_name(id, None), "trained/model-deadbeef");
    }
}
