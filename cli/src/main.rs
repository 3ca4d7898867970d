//! `managerctl`: the command-line client of the Cocos manager. It speaks the
//! compatible `manager.ManagerService` (create, remove, info, policy) and the
//! operator's `cocos.manager.v1.Operator` (list, info, logs, events; `info`
//! falls back to `CVMInfo` on a Cocos manager), reads its connection settings
//! from flags or the Cocos CLI's environment variables, and exits with codes
//! a script can rely on (see `--help`).

mod agent;
mod args;
mod connect;
mod failure;
mod follow;
mod view;

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use cocos_core::duration::format_go_duration;
use cocos_core::operator_proto::{
    GetVmRequest, ListVmsRequest, LogSource, StreamLogsRequest, WatchEventsRequest,
};
use cocos_core::proto::{AttestationPolicyReq, CreateReq, CvmInfoReq, RemoveReq};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use tonic::Code;

use args::{Cli, Command, Create, LogsArgs, Output};
use connect::Target;
use failure::{Failure, Redactor};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let what = match &cli.command {
        Command::Create(_) => "create".to_string(),
        Command::Remove { id } => format!("remove {id}"),
        Command::List => "list".to_string(),
        Command::Info { id, .. } => format!("info {id}"),
        Command::Logs(logs) => format!("logs {}", logs.id),
        Command::Events { id: None } => "events".to_string(),
        Command::Events { id: Some(id) } => format!("events {id}"),
        Command::Policy { id } => format!("policy {id}"),
    };
    let mut redactor = Redactor::default();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("managerctl: cannot start: {e}");
            return ExitCode::from(failure::EXIT_OTHER);
        }
    };
    match runtime.block_on(run(cli, &mut redactor)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            let line = redactor.clean(&format!("managerctl: {what} failed: {failure}"));
            eprintln!("{line}");
            ExitCode::from(failure.exit_code())
        }
    }
}

async fn run(cli: Cli, redactor: &mut Redactor) -> Result<(), Failure> {
    let target = Target::resolve(&cli.conn)?;
    let output = cli.output;
    match cli.command {
        Command::Create(create) => create_vm(&target, *create, output, redactor).await,
        Command::Remove { id } => {
            let mut client = target.connect().await?;
            let request = target.request(RemoveReq { cvm_id: id.clone() });
            target.call(client.remove_vm(request)).await?;
            match output {
                Output::Json => emit_json(&json!({ "id": id, "removed": true })),
                Output::Table => emit(&format!("removed VM {id}")),
            }
            Ok(())
        }
        Command::List => {
            let mut client = target.operator_client(target.channel(false).await?);
            let listed = target
                .call(client.list_vms(target.request(ListVmsRequest {})))
                .await
                .map_err(|f| operator_failure(&target, "list", f))?;
            match output {
                Output::Json => emit_json(&view::list_json(&listed.vms)),
                Output::Table => {
                    let rows: Vec<Vec<String>> = listed.vms.iter().map(view::vm_row).collect();
                    emit(&view::table(&view::LIST_HEADERS, &rows));
                }
            }
            Ok(())
        }
        Command::Info { id, settings } => info(&target, id, output, settings).await,
        Command::Logs(logs) => stream_logs(&target, logs, output).await,
        Command::Events { id } => watch_events(&target, id, output).await,
        Command::Policy { id } => {
            let mut client = target.connect().await?;
            let request = target.request(AttestationPolicyReq { id: id.clone() });
            let policy = target.call(client.attestation_policy(request)).await?;
            let document: Value = serde_json::from_slice(&policy.info).map_err(|e| {
                Failure::grpc(
                    Code::Internal,
                    format!("the attestation policy of {id} is not JSON: {e}"),
                )
            })?;
            match output {
                Output::Json => emit_json(&document),
                Output::Table => emit(
                    &serde_json::to_string_pretty(&document)
                        .unwrap_or_else(|_| document.to_string()),
                ),
            }
            Ok(())
        }
    }
}

/// An operator RPC's failure; UNIMPLEMENTED means a manager without the
/// operator's service, and says so.
fn operator_failure(target: &Target, command: &str, failure: Failure) -> Failure {
    if failure.code == Some(Code::Unimplemented) {
        target.no_operator_service(command)
    } else {
        failure
    }
}

/// `info`: GetVm, or CVMInfo from a manager without the operator's service.
async fn info(target: &Target, id: String, output: Output, settings: bool) -> Result<(), Failure> {
    let channel = target.channel(false).await?;
    let mut operator = target.operator_client(channel.clone());
    let request = target.request(GetVmRequest { id: id.clone() });
    match target.call(operator.get_vm(request)).await {
        Ok(got) => {
            match output {
                Output::Json => emit_json(&view::info_json(&id, &got)),
                Output::Table => emit(&view::pairs(&view::info_pairs(&id, &got, settings))),
            }
            return Ok(());
        }
        Err(failure) if failure.code == Some(Code::Unimplemented) => {}
        Err(failure) => return Err(failure),
    }
    let mut client = target.manager_client(channel);
    let request = target.request(CvmInfoReq { id });
    let info = target.call(client.cvm_info(request)).await?;
    match output {
        Output::Json => emit_json(&json!({
            "id": info.id,
            "ovmf_version": info.ovmf_version,
            "cpu_num": info.cpu_num,
            "cpu_type": info.cpu_type,
            "kernel_cmd": info.kernel_cmd,
            "eos_version": info.eos_version,
            "api": "cocos",
        })),
        Output::Table => emit_pairs(&[
            ("ID", info.id),
            ("OVMF VERSION", info.ovmf_version),
            ("CPUS", info.cpu_num.to_string()),
            ("CPU TYPE", info.cpu_type),
            ("KERNEL CMDLINE", info.kernel_cmd),
            ("EOS VERSION", info.eos_version),
        ]),
    }
    Ok(())
}

/// `logs`: the console (or QEMU) log's last lines, then with `--follow` new
/// ones until Ctrl-C or the VM's removal. Lines are printed as the bytes
/// they are (a console need not be UTF-8); JSON: one object per line.
async fn stream_logs(target: &Target, args: LogsArgs, output: Output) -> Result<(), Failure> {
    let mut interrupt = follow::Interrupt::install()?;
    let source = if args.qemu {
        LogSource::Qemu
    } else {
        LogSource::Console
    };
    let request = StreamLogsRequest {
        id: args.id,
        source: source as i32,
        tail_lines: args.tail,
        follow: args.follow,
    };
    // A following stream has no deadline (it lasts as long as the VM); one
    // that does not follow must keep coming within the bound.
    let per_message = (!args.follow).then_some(target.timeout);
    let opening = async {
        let mut client = target.operator_client(target.channel(args.follow).await?);
        target
            .call(client.stream_logs(tonic::Request::new(request)))
            .await
            .map_err(|f| operator_failure(target, "logs", f))
    };
    let Some(mut stream) = follow::open(&mut interrupt, opening).await? else {
        return Ok(());
    };
    follow::drain(
        target,
        &mut stream,
        &mut interrupt,
        per_message,
        |line| match output {
            Output::Table => follow::print_line(&line.line),
            Output::Json => follow::print_line(view::log_json(&line).to_string().as_bytes()),
        },
    )
    .await?;
    Ok(())
}

/// `events`: follows WatchEvents until Ctrl-C (or the manager ends it): one
/// line per event, or one JSON object per line.
async fn watch_events(target: &Target, id: Option<String>, output: Output) -> Result<(), Failure> {
    let mut interrupt = follow::Interrupt::install()?;
    let request = tonic::Request::new(WatchEventsRequest {
        id: id.unwrap_or_default(),
    });
    let opening = async {
        let mut client = target.operator_client(target.channel(true).await?);
        target
            .call(client.watch_events(request))
            .await
            .map_err(|f| operator_failure(target, "events", f))
    };
    let Some(mut stream) = follow::open(&mut interrupt, opening).await? else {
        return Ok(());
    };
    follow::drain(target, &mut stream, &mut interrupt, None, |event| {
        let line = match output {
            Output::Table => view::event_line(&event),
            Output::Json => view::event_json(&event).to_string(),
        };
        follow::print_line(line.as_bytes())
    })
    .await?;
    Ok(())
}

fn read_file(flag: &str, path: &Option<std::path::PathBuf>) -> Result<Vec<u8>, Failure> {
    match path {
        None => Ok(Vec::new()),
        Some(path) => std::fs::read(path)
            .map_err(|e| Failure::usage(format!("{flag} {}: cannot read it: {e}", path.display()))),
    }
}

fn spinner() -> ProgressBar {
    // Drawn on stderr, and only when it is a terminal: scripts and JSON
    // readers see nothing of it.
    let bar = ProgressBar::new_spinner();
    if let Ok(style) = ProgressStyle::with_template("{spinner} [{elapsed}] {wide_msg}") {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

async fn create_vm(
    target: &Target,
    args: Create,
    output: Output,
    redactor: &mut Redactor,
) -> Result<(), Failure> {
    let text = |v: &Option<String>| v.clone().unwrap_or_default();
    let request = CreateReq {
        agent_log_level: text(&args.log_level),
        agent_cvm_server_ca_cert: read_file("--server-ca", &args.server_ca)?,
        agent_cvm_client_key: read_file("--client-key", &args.client_key)?,
        agent_cvm_client_cert: read_file("--client-crt", &args.client_crt)?,
        agent_cvm_server_url: text(&args.server_url),
        agent_cvm_ca_url: text(&args.ca_url),
        ttl: text(&args.ttl),
        agent_certs_token: text(&args.certs_token),
        aws_access_key_id: text(&args.aws_access_key_id),
        aws_secret_access_key: text(&args.aws_secret_access_key),
        aws_endpoint_url: text(&args.aws_endpoint_url),
        aws_region: text(&args.aws_region),
        aa_kbs_params: text(&args.aa_kbs_params),
    };
    redactor.add(&String::from_utf8_lossy(&request.agent_cvm_client_key));
    redactor.add(&request.agent_certs_token);
    redactor.add(&request.aws_secret_access_key);
    let wait_limit = if args.wait {
        Some(connect::parse_timeout(
            "--wait-timeout",
            &args.wait_timeout,
        )?)
    } else {
        None
    };
    let agent_host = args
        .wait_host
        .clone()
        .filter(|h| !h.trim().is_empty())
        .unwrap_or_else(|| target.host.clone());

    let bar = spinner();
    bar.set_message(format!("creating a VM on {}", target.uri));
    let created = async {
        let mut client = target.connect().await?;
        target.call(client.create_vm(target.request(request))).await
    }
    .await;
    let created = match created {
        Ok(created) => created,
        Err(failure) => {
            bar.finish_and_clear();
            return Err(failure);
        }
    };
    let id = created.cvm_id;
    let port: u16 = match created.forwarded_port.parse() {
        Ok(port) => port,
        Err(_) => {
            bar.finish_and_clear();
            return Err(Failure::grpc(
                Code::Internal,
                format!(
                    "VM {id} was created but its forwarded port {:?} is not a port number",
                    created.forwarded_port
                ),
            ));
        }
    };

    let mut agent: Option<Result<(), String>> = None;
    if let Some(limit) = wait_limit {
        let base = format!(
            "waiting up to {} for the agent at {agent_host}:{port} (VM {id})",
            format_go_duration(limit)
        );
        bar.set_message(base.clone());
        let waited = agent::wait_ready(&agent_host, port, limit, |last| {
            bar.set_message(format!("{base}; last: {last}"));
        })
        .await;
        agent = Some(waited);
    }
    bar.finish_and_clear();

    let ready = agent.as_ref().map(Result::is_ok);
    match output {
        Output::Json => {
            let mut doc = json!({ "id": id, "port": port, "host": agent_host });
            if let Some(ready) = ready {
                doc["agent_ready"] = Value::Bool(ready);
            }
            emit_json(&doc);
        }
        Output::Table => {
            let mut rows = vec![("ID", id.clone()), ("PORT", port.to_string())];
            match ready {
                Some(true) => rows.push(("AGENT", format!("ready at {agent_host}:{port}"))),
                Some(false) => rows.push(("AGENT", format!("not ready at {agent_host}:{port}"))),
                None => {}
            }
            emit_pairs(&rows);
        }
    }
    match (agent, wait_limit) {
        (Some(Err(last)), Some(limit)) => Err(Failure::grpc(
            Code::DeadlineExceeded,
            format!(
                "VM {id} was created (port {port}) but its agent at {agent_host}:{port} did not \
                 answer GET /health within {} (--wait-timeout; last: {last}); it is still there: \
                 managerctl remove {id}",
                format_go_duration(limit)
            ),
        )),
        _ => Ok(()),
    }
}

/// Writes to stdout; a closed stdout (e.g. `| head`) is not an error.
fn emit(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}

fn emit_json(value: &Value) {
    emit(&value.to_string());
}

/// A two-column table of fields.
fn emit_pairs(rows: &[(&str, String)]) {
    emit(&view::pairs(rows));
}
