//! The tools. Each is one REST call (or a few), named plainly, with a
//! description written for the model that will choose between them.

use std::time::{Duration, Instant};

use base64::Engine as _;
use futures_util::StreamExt;
use hangar_api::{
    App, AppList, Checkpoint, CheckpointDiff, CheckpointList, CreateCheckpointRequest, CreateMachineRequest,
    ExecRequest, ExecResponse, ExecStreamEvent, FileInfo, FileList, ForkMachineRequest, ImageInfo, ImageList,
    InitConfig, Machine, MachineConfig, StopRequest, Volume,
};
use rmcp::handler::server::wrapper::{Json, Parameters};
use rmcp::model::{ProgressNotificationParam, ProgressToken};
use rmcp::service::RequestContext;
use rmcp::{RoleServer, tool, tool_router};

use crate::HangarMcp;
use crate::api::{ApiRequest, ToolError, ToolResult, collect, query, seg};
use crate::args::*;

/// Each exec stream keeps this much of its end.
const OUTPUT_KEEP: usize = 64 * 1024;
/// The default exec timeout: a command that hangs must not hang the agent.
const EXEC_TIMEOUT_S: u64 = 600;
/// The largest file read_file returns.
const READ_LIMIT: usize = 4 << 20;
/// How often a streaming exec reports progress at most.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

fn machine_path(app: &str, machine: &str) -> String {
    format!("/v1/apps/{}/machines/{}", seg(app), seg(machine))
}

fn checkpoint_path(app: &str, machine: &str, checkpoint: &str) -> String {
    format!("{}/checkpoints/{}", machine_path(app, machine), seg(checkpoint))
}

#[tool_router(vis = "pub(crate)")]
impl HangarMcp {
    #[tool(
        description = "List the apps (namespaces of machines, volumes and secrets). The `default` app is used when a tool's `app` is left out.",
        annotations(read_only_hint = true)
    )]
    async fn list_apps(&self) -> Result<Json<AppList>, ToolError> {
        self.api.get("/v1/apps".into()).await.map(Json)
    }

    #[tool(
        description = "Create an app: a namespace for machines, volumes and secrets. Only needed for apps other than `default`, which is created on first use."
    )]
    async fn create_app(&self, Parameters(a): Parameters<CreateAppArgs>) -> Result<Json<App>, ToolError> {
        let body = serde_json::json!({ "app_name": a.app });
        self.api.post("/v1/apps".into(), &body).await.map(Json)
    }

    #[tool(
        description = "Create a machine from an image and start it. SLOW (seconds: the image's filesystem is laid out once), so create a machine once and then stop and start it, which is fast. The machine's whole filesystem persists across stop/start. Returns the machine; use its `id` (or `name`) as `machine_id` in other tools. With no `cmd`, the image's own command runs; give `[\"sleep\", \"infinity\"]` for a machine to exec into."
    )]
    async fn create_machine(
        &self,
        ctx: RequestContext<RoleServer>,
        Parameters(a): Parameters<CreateMachineArgs>,
    ) -> Result<Json<Machine>, ToolError> {
        self.ensure_app(&a.app).await?;
        let req = CreateMachineRequest {
            name: a.name,
            config: MachineConfig {
                image: a.image,
                init: InitConfig {
                    exec: a.cmd,
                    ..Default::default()
                },
                env: a.env,
                guest: a.guest,
                services: a.services,
                mounts: a.mounts,
                secrets: a.secrets,
                runtime: a.runtime,
                ..Default::default()
            },
            skip_launch: a.skip_launch,
            region: None,
        };
        let m: Machine = self
            .api
            .post(format!("/v1/apps/{}/machines", seg(&a.app)), &req)
            .await?;
        self.machines_changed(&ctx).await;
        Ok(Json(m))
    }

    #[tool(
        description = "List the machines of an app with their state (`started`, `stopped`, `suspended`, `failed`, …) and config.",
        annotations(read_only_hint = true)
    )]
    async fn list_machines(&self, Parameters(a): Parameters<ListMachinesArgs>) -> Result<Json<MachineList>, ToolError> {
        let states: Vec<String> = a.state.iter().map(|s| s.to_string()).collect();
        let q = if states.is_empty() {
            String::new()
        } else {
            query(&[("state", &states.join(","))])
        };
        let machines = self.api.get(format!("/v1/apps/{}/machines{q}", seg(&a.app))).await?;
        Ok(Json(MachineList { machines }))
    }

    #[tool(
        description = "Get one machine: its state, config, last exit and metered run time.",
        annotations(read_only_hint = true)
    )]
    async fn get_machine(&self, Parameters(a): Parameters<MachineArgs>) -> Result<Json<Machine>, ToolError> {
        self.api.get(machine_path(&a.app, &a.machine_id)).await.map(Json)
    }

    #[tool(
        description = "Start a stopped, created, failed or suspended machine. FAST (milliseconds): its filesystem is as it was left; a suspended machine resumes with its memory. Returns when it is started."
    )]
    async fn start_machine(&self, Parameters(a): Parameters<MachineArgs>) -> Result<Json<Machine>, ToolError> {
        let path = format!("{}/start", machine_path(&a.app, &a.machine_id));
        self.api.post(path, &serde_json::json!({})).await.map(Json)
    }

    #[tool(
        description = "Stop a started machine: SIGTERM, then SIGKILL after `timeout` seconds. Its processes end but its files are kept, and a stopped machine costs only disk. start_machine brings it back in milliseconds. Stop machines when you are done with them."
    )]
    async fn stop_machine(&self, Parameters(a): Parameters<StopMachineArgs>) -> Result<Json<Machine>, ToolError> {
        let req = StopRequest {
            signal: None,
            timeout: a.timeout.map(hangar_api::Duration::Seconds),
        };
        let path = format!("{}/stop", machine_path(&a.app, &a.machine_id));
        self.api.post(path, &req).await.map(Json)
    }

    #[tool(
        description = "Suspend a started machine: its processes are paused with their memory kept, so start_machine resumes them where they were. Uses no CPU and is not billed as running."
    )]
    async fn suspend_machine(&self, Parameters(a): Parameters<MachineArgs>) -> Result<Json<Machine>, ToolError> {
        let path = format!("{}/suspend", machine_path(&a.app, &a.machine_id));
        self.api.post(path, &serde_json::json!({})).await.map(Json)
    }

    #[tool(
        description = "Destroy a machine and its filesystem and checkpoints, for good. A started machine needs `force: true` (or stop_machine first). To keep the work, checkpoint or fork first.",
        annotations(destructive_hint = true)
    )]
    async fn destroy_machine(
        &self,
        ctx: RequestContext<RoleServer>,
        Parameters(a): Parameters<DestroyMachineArgs>,
    ) -> Result<Json<Done>, ToolError> {
        let q = if a.force { "?force=true" } else { "" };
        self.api
            .delete(format!("{}{q}", machine_path(&a.app, &a.machine_id)))
            .await?;
        self.machines_changed(&ctx).await;
        Ok(Json(Done { ok: true }))
    }

    #[tool(
        description = "Wait until a machine reaches a state (`started`, `stopped`, `failed` or `destroyed`), for example for a machine whose main process should finish. Fails after `timeout` seconds.",
        annotations(read_only_hint = true)
    )]
    async fn wait_machine(&self, Parameters(a): Parameters<WaitMachineArgs>) -> Result<Json<Machine>, ToolError> {
        let timeout = a.timeout.unwrap_or(60).to_string();
        let q = query(&[("state", &a.state.to_string()), ("timeout", &timeout)]);
        self.api
            .get(format!("{}/wait{q}", machine_path(&a.app, &a.machine_id)))
            .await
            .map(Json)
    }

    #[tool(
        description = "Run a command in a started machine and return its exit code, stdout and stderr (the last 64 KiB of each). Changes it makes to files persist. Runs as root in `/` unless `user`/`cwd` say otherwise; killed after `timeout` seconds (default 600). If you send a progress token, output is reported as progress notifications while the command runs: use that for builds and tests that take a while."
    )]
    async fn exec(
        &self,
        ctx: RequestContext<RoleServer>,
        Parameters(a): Parameters<ExecArgs>,
    ) -> Result<Json<ExecResult>, ToolError> {
        if a.command.is_empty() {
            return Err(ToolError::new("`command` is empty: give argv, e.g. [\"ls\", \"-l\"]"));
        }
        let path = machine_path(&a.app, &a.machine_id);
        let req = ExecRequest {
            command: a.command,
            stdin: a.stdin,
            env: a.env,
            cwd: a.cwd,
            user: a.user,
            timeout: Some(a.timeout.unwrap_or(EXEC_TIMEOUT_S)),
        };
        match ctx.meta.get_progress_token() {
            None => {
                let r: ExecResponse = self.api.post(format!("{path}/exec"), &req).await?;
                Ok(Json(ExecResult::new(r, false)))
            }
            Some(token) => self
                .exec_streaming(&ctx, token, format!("{path}/exec/stream"), &req)
                .await
                .map(Json),
        }
    }

    #[tool(
        description = "Read a file from a started machine (up to 4 MiB). Text by default; pass `encoding: base64` for binary files.",
        annotations(read_only_hint = true)
    )]
    async fn read_file(&self, Parameters(a): Parameters<ReadFileArgs>) -> Result<Json<FileContent>, ToolError> {
        let bytes = self.read_bytes(&a.app, &a.machine_id, &a.path).await?;
        let size = bytes.len() as u64;
        let content = match a.encoding {
            Encoding::Base64 => base64::engine::general_purpose::STANDARD.encode(&bytes),
            Encoding::Utf8 => String::from_utf8(bytes)
                .map_err(|_| ToolError::new(format!("{} is not UTF-8 text: read it with encoding: base64", a.path)))?,
        };
        Ok(Json(FileContent {
            path: a.path,
            content,
            encoding: a.encoding,
            size,
        }))
    }

    #[tool(
        description = "Write a whole file in a started machine, replacing it atomically (readers see the old or the new content, never a mix). Creates missing parent directories. Use `mode: \"755\"` for a script you will run."
    )]
    async fn write_file(&self, Parameters(a): Parameters<WriteFileArgs>) -> Result<Json<FileInfo>, ToolError> {
        let content = match a.encoding {
            Encoding::Utf8 => a.content.into_bytes(),
            Encoding::Base64 => base64::engine::general_purpose::STANDARD
                .decode(a.content.trim())
                .map_err(|e| {
                    ToolError::new(format!(
                        "`content` is not valid base64 ({e}): encode it, or use encoding: utf8 for text"
                    ))
                })?,
        };
        let mut pairs = vec![("path", a.path.as_str())];
        if let Some(mode) = &a.mode {
            pairs.push(("mode", mode));
        }
        if a.parents {
            pairs.push(("parents", "true"));
        }
        let path = format!("{}/files/content{}", machine_path(&a.app, &a.machine_id), query(&pairs));
        self.api
            .json(ApiRequest::new(http::Method::PUT, path).bytes(content))
            .await
            .map(Json)
    }

    #[tool(
        description = "List a directory in a started machine: names, kinds, sizes, modes.",
        annotations(read_only_hint = true)
    )]
    async fn list_files(&self, Parameters(a): Parameters<PathArgs>) -> Result<Json<FileList>, ToolError> {
        let q = query(&[("path", &a.path)]);
        self.api
            .get(format!("{}/files/list{q}", machine_path(&a.app, &a.machine_id)))
            .await
            .map(Json)
    }

    #[tool(
        description = "Remove a file, symlink or (with `recursive: true`) a directory and everything in it, in a started machine.",
        annotations(destructive_hint = true)
    )]
    async fn remove_file(&self, Parameters(a): Parameters<RemoveFileArgs>) -> Result<Json<Done>, ToolError> {
        let mut pairs = vec![("path", a.path.as_str())];
        if a.recursive {
            pairs.push(("recursive", "true"));
        }
        self.api
            .delete(format!(
                "{}/files{}",
                machine_path(&a.app, &a.machine_id),
                query(&pairs)
            ))
            .await?;
        Ok(Json(Done { ok: true }))
    }

    #[tool(
        description = "Read the end of a machine's log: what its main process wrote to stdout and stderr (exec output is not in it). Works on stopped machines too.",
        annotations(read_only_hint = true)
    )]
    async fn get_logs(&self, Parameters(a): Parameters<LogsArgs>) -> Result<Json<Logs>, ToolError> {
        let text = self
            .logs(&a.app, &a.machine_id, a.tail_bytes.unwrap_or(16 * 1024).min(1 << 20))
            .await?;
        Ok(Json(Logs { text }))
    }

    #[tool(
        description = "Checkpoint a machine's whole filesystem, in milliseconds whatever its size (a running machine is paused only for that long). Take one before a risky step: restore_checkpoint rolls back to it, diff_checkpoint shows what changed since, fork_machine copies from it. Process memory is not included."
    )]
    async fn create_checkpoint(
        &self,
        Parameters(a): Parameters<CreateCheckpointArgs>,
    ) -> Result<Json<Checkpoint>, ToolError> {
        let path = format!("{}/checkpoints", machine_path(&a.app, &a.machine_id));
        self.api
            .post(path, &CreateCheckpointRequest { comment: a.comment })
            .await
            .map(Json)
    }

    #[tool(
        description = "List a machine's checkpoints, oldest first, with their comments.",
        annotations(read_only_hint = true)
    )]
    async fn list_checkpoints(
        &self,
        Parameters(a): Parameters<MachineArgs>,
    ) -> Result<Json<CheckpointList>, ToolError> {
        self.api
            .get(format!("{}/checkpoints", machine_path(&a.app, &a.machine_id)))
            .await
            .map(Json)
    }

    #[tool(
        description = "Show what changed in a machine's filesystem since a checkpoint (or between two): each path added, modified or deleted, with sizes. Pass `path` to also get the unified diff of one text file.",
        annotations(read_only_hint = true)
    )]
    async fn diff_checkpoint(
        &self,
        Parameters(a): Parameters<DiffCheckpointArgs>,
    ) -> Result<Json<CheckpointDiff>, ToolError> {
        let limit = a.limit.unwrap_or(1000).to_string();
        let mut pairs = vec![("limit", limit.as_str())];
        if let Some(to) = &a.to {
            pairs.push(("to", to));
        }
        if let Some(path) = &a.path {
            pairs.push(("path", path));
        }
        let path = format!(
            "{}/diff{}",
            checkpoint_path(&a.app, &a.machine_id, &a.checkpoint_id),
            query(&pairs)
        );
        self.api.get(path).await.map(Json)
    }

    #[tool(
        description = "Roll a machine's filesystem back to a checkpoint, exactly. Everything written since is discarded (checkpoint first to keep it). A started machine is restarted on the restored filesystem.",
        annotations(destructive_hint = true)
    )]
    async fn restore_checkpoint(&self, Parameters(a): Parameters<CheckpointArgs>) -> Result<Json<Machine>, ToolError> {
        let path = format!("{}/restore", checkpoint_path(&a.app, &a.machine_id, &a.checkpoint_id));
        self.api.post(path, &serde_json::json!({})).await.map(Json)
    }

    #[tool(
        description = "Fork a machine: a new machine with a copy of its filesystem (as it is now, or at a checkpoint), made in milliseconds. The two are isolated both ways: use forks to try two approaches side by side, then destroy the loser."
    )]
    async fn fork_machine(
        &self,
        ctx: RequestContext<RoleServer>,
        Parameters(a): Parameters<ForkMachineArgs>,
    ) -> Result<Json<Machine>, ToolError> {
        let req = ForkMachineRequest {
            name: a.name,
            checkpoint: a.checkpoint_id,
            skip_launch: a.skip_launch,
            inherit_secrets: a.inherit_secrets,
        };
        let m: Machine = self
            .api
            .post(format!("{}/fork", machine_path(&a.app, &a.machine_id)), &req)
            .await?;
        self.machines_changed(&ctx).await;
        Ok(Json(m))
    }

    #[tool(
        description = "Create a volume: storage that outlives machines, mounted by one machine at a time (create_machine's `mounts`). Up to `size_gb` GB."
    )]
    async fn create_volume(&self, Parameters(a): Parameters<CreateVolumeArgs>) -> Result<Json<Volume>, ToolError> {
        self.ensure_app(&a.app).await?;
        let body = hangar_api::CreateVolumeRequest {
            name: a.name,
            size_gb: a.size_gb,
        };
        self.api
            .post(format!("/v1/apps/{}/volumes", seg(&a.app)), &body)
            .await
            .map(Json)
    }

    #[tool(
        description = "List an app's volumes and which machine mounts each.",
        annotations(read_only_hint = true)
    )]
    async fn list_volumes(&self, Parameters(a): Parameters<AppArgs>) -> Result<Json<VolumeList>, ToolError> {
        let volumes = self.api.get(format!("/v1/apps/{}/volumes", seg(&a.app))).await?;
        Ok(Json(VolumeList { volumes }))
    }

    #[tool(
        description = "Delete a volume that no machine mounts. It can be recovered through the REST API until its `purge_at`.",
        annotations(destructive_hint = true)
    )]
    async fn delete_volume(&self, Parameters(a): Parameters<VolumeArgs>) -> Result<Json<Volume>, ToolError> {
        let path = format!("/v1/apps/{}/volumes/{}", seg(&a.app), seg(&a.volume_id));
        self.api
            .json(ApiRequest::new(http::Method::DELETE, path))
            .await
            .map(Json)
    }

    #[tool(
        description = "Pull an image from a registry into the local store, so create_machine can use it. Can take a while for big images; with a progress token, progress is reported in bytes. Layers already present are not downloaded again."
    )]
    async fn pull_image(
        &self,
        ctx: RequestContext<RoleServer>,
        Parameters(a): Parameters<PullImageArgs>,
    ) -> Result<Json<ImageInfo>, ToolError> {
        let body = hangar_api::PullImageRequest { image: a.image };
        let req = ApiRequest::new(http::Method::POST, "/v1/images/pull".into())
            .json(&body)
            .streamed();
        let mut lines = ndjson(self.api.send(req).await?.body);
        let token = ctx.meta.get_progress_token();
        while let Some(line) = lines.next().await {
            match serde_json::from_slice::<hangar_api::PullEvent>(&line?) {
                Ok(hangar_api::PullEvent::Image(image)) => return Ok(Json(image)),
                Ok(hangar_api::PullEvent::Error(e)) => {
                    return Err(ToolError::new(format!("pull failed: {} ({})", e.error, e.code)));
                }
                Ok(hangar_api::PullEvent::Progress(p)) => {
                    if let Some(token) = &token {
                        let (done, total) = (p.downloaded, p.total);
                        let mut param = ProgressNotificationParam::new(token.clone(), done as f64)
                            .with_message(format!("{done} of {total} bytes"));
                        if total > 0 {
                            param = param.with_total(total as f64);
                        }
                        let _ = ctx.peer.notify_progress(param).await;
                    }
                }
                Err(e) => {
                    return Err(ToolError::new(format!(
                        "the daemon sent a progress line this server cannot read: {e}"
                    )));
                }
            }
        }
        Err(ToolError::new(
            "the pull's answer ended before the image: retry pull_image",
        ))
    }

    #[tool(
        description = "List the images in the local store (what create_machine can use without pulling), with disk use.",
        annotations(read_only_hint = true)
    )]
    async fn list_images(&self) -> Result<Json<ImageList>, ToolError> {
        self.api.get("/v1/images".into()).await.map(Json)
    }
}

impl HangarMcp {
    /// The app `default` exists without anyone creating it, as in the CLI.
    async fn ensure_app(&self, app: &str) -> ToolResult<()> {
        if app != DEFAULT_APP {
            return Ok(());
        }
        let body = serde_json::json!({ "app_name": DEFAULT_APP });
        match self.api.post::<App>("/v1/apps".into(), &body).await {
            // It exists already (or another caller made it just now).
            Err(e) if e.code.as_deref() == Some("conflict") => Ok(()),
            created => created.map(drop),
        }
    }

    pub(crate) async fn read_bytes(&self, app: &str, machine: &str, path: &str) -> ToolResult<Vec<u8>> {
        let q = query(&[("path", path)]);
        let req = ApiRequest::get(format!("{}/files/content{q}", machine_path(app, machine)));
        let resp = self.api.send(req).await?;
        collect(resp.body, READ_LIMIT).await.map_err(|e| {
            ToolError::new(format!(
                "{e}: read part of {path} with exec (e.g. [\"head\", \"-c\", \"100000\", \"{path}\"])"
            ))
        })
    }

    pub(crate) async fn logs(&self, app: &str, machine: &str, tail_bytes: u64) -> ToolResult<String> {
        let req = ApiRequest::get(format!("{}/logs?tail_bytes={tail_bytes}", machine_path(app, machine)));
        let resp = self.api.send(req).await?;
        let bytes = collect(resp.body, (tail_bytes as usize).saturating_add(64 * 1024)).await?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Runs a command through the streaming exec, reporting its output as
    /// progress while it runs.
    async fn exec_streaming(
        &self,
        ctx: &RequestContext<RoleServer>,
        token: ProgressToken,
        path: String,
        req: &ExecRequest,
    ) -> ToolResult<ExecResult> {
        let req = ApiRequest::new(http::Method::POST, path).json(req).streamed();
        let resp = self.api.send(req).await?;
        let mut lines = ndjson(resp.body);
        let (mut stdout, mut stderr) = (Tail::default(), Tail::default());
        let mut last_report: Option<Instant> = None;
        let mut reported = 0u64;
        while let Some(line) = lines.next().await {
            let event: ExecStreamEvent = serde_json::from_slice(&line?)
                .map_err(|e| ToolError::new(format!("the daemon sent an exec line this server cannot read: {e}")))?;
            let text = match event {
                ExecStreamEvent::Stdout { data } => stdout.push(data),
                ExecStreamEvent::Stderr { data } => stderr.push(data),
                ExecStreamEvent::Exit {
                    exit_code,
                    exit_signal,
                    timed_out,
                } => {
                    let cut = stdout.cut || stderr.cut;
                    let (stdout, stderr) = (stdout.text, stderr.text);
                    let output = ExecResponse {
                        exit_code,
                        exit_signal,
                        stdout,
                        stderr,
                        timed_out,
                    };
                    return Ok(ExecResult::new(output, cut));
                }
                ExecStreamEvent::Error { error } => return Err(ToolError::new(format!("exec failed: {error}"))),
            };
            reported += text.len() as u64;
            if last_report.is_none_or(|t| t.elapsed() >= PROGRESS_EVERY) {
                last_report = Some(Instant::now());
                let message = last_line(&text);
                let param = ProgressNotificationParam::new(token.clone(), reported as f64).with_message(message);
                // A client that stopped listening still gets the result.
                let _ = ctx.peer.notify_progress(param).await;
            }
        }
        Err(ToolError::new(
            "the command's output ended without an exit status: check the machine with get_machine",
        ))
    }

    /// Tells the client its resource list (one log per machine) changed.
    async fn machines_changed(&self, ctx: &RequestContext<RoleServer>) {
        let _ = ctx.peer.notify_resource_list_changed().await;
    }
}

/// Splits a streamed body into lines.
fn ndjson(
    body: futures_util::stream::BoxStream<'static, Result<bytes::Bytes, String>>,
) -> impl futures_util::Stream<Item = ToolResult<Vec<u8>>> + Send + Unpin {
    Box::pin(futures_util::stream::unfold(
        (body, Vec::<u8>::new(), false),
        |(mut body, mut buf, mut ended)| async move {
            loop {
                if let Some(i) = buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=i).collect();
                    return Some((Ok(line), (body, buf, ended)));
                }
                if ended {
                    if buf.iter().all(u8::is_ascii_whitespace) {
                        return None;
                    }
                    return Some((Ok(std::mem::take(&mut buf)), (body, buf, ended)));
                }
                match body.next().await {
                    Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                    Some(Err(e)) => {
                        let err = ToolError::new(format!("the daemon's answer was cut short: {e}"));
                        return Some((Err(err), (body, Vec::new(), true)));
                    }
                    None => ended = true,
                }
            }
        },
    ))
}

impl ExecResult {
    /// `output` with each stream cut to its end; `cut` if some was already.
    fn new(mut output: ExecResponse, cut: bool) -> Self {
        let (stdout, cut_out) = keep_end(std::mem::take(&mut output.stdout));
        let (stderr, cut_err) = keep_end(std::mem::take(&mut output.stderr));
        output.stdout = stdout;
        output.stderr = stderr;
        Self {
            output,
            truncated: cut || cut_out || cut_err,
        }
    }
}

/// The end of a stream of output, at most [`OUTPUT_KEEP`] bytes.
#[derive(Default)]
struct Tail {
    text: String,
    cut: bool,
}

impl Tail {
    /// Appends and returns the new text (for progress).
    fn push(&mut self, data: String) -> String {
        self.text.push_str(&data);
        if self.text.len() > 2 * OUTPUT_KEEP {
            let (kept, _) = keep_end(std::mem::take(&mut self.text));
            self.text = kept;
            self.cut = true;
        }
        data
    }
}

/// The last [`OUTPUT_KEEP`] bytes of `s` (on a character boundary), and
/// whether anything was cut.
fn keep_end(s: String) -> (String, bool) {
    if s.len() <= OUTPUT_KEEP {
        return (s, false);
    }
    let mut start = s.len() - OUTPUT_KEEP;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    (s[start..].to_owned(), true)
}

/// The last non-empty line of a chunk, shortened for a progress message.
fn last_line(text: &str) -> String {
    let line = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim_end();
    let mut end = line.len().min(200);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    line[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_end_cuts_on_a_char_boundary() {
        let s = format!("é{}", "x".repeat(OUTPUT_KEEP - 1));
        let (kept, cut) = keep_end(s);
        assert!(cut);
        assert_eq!(kept.len(), OUTPUT_KEEP - 1);
        assert_eq!(keep_end("short".into()), ("short".into(), false));
    }

    #[test]
    fn progress_message_is_the_last_line() {
        assert_eq!(last_line("a\nb\n\n"), "b");
        assert_eq!(last_line(&"é".repeat(300)).len(), 200);
    }

    #[tokio::test]
    async fn ndjson_splits_lines_across_chunks() {
        let chunks: Vec<Result<bytes::Bytes, String>> =
            vec![Ok("{\"a\":1}\n{\"b\"".into()), Ok(":2}\n{\"c\":3}".into())];
        let lines: Vec<_> = ndjson(Box::pin(futures_util::stream::iter(chunks))).collect().await;
        let lines: Vec<String> = lines
            .into_iter()
            .map(|l| String::from_utf8(l.unwrap()).unwrap())
            .collect();
        assert_eq!(lines, ["{\"a\":1}\n", "{\"b\":2}\n", "{\"c\":3}"]);
    }
}
