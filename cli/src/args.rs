//! The command line: global connection options (flags or the Cocos CLI's
//! environment variables) and the subcommands: one per `manager.ManagerService`
//! RPC, and `list`, `logs` and `events` over the operator's service
//! (`cocos.manager.v1.Operator`).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Exit codes, as documented in `managerctl --help` and the README.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success
  1  any other failure (e.g. FAILED_PRECONDITION, RESOURCE_EXHAUSTED, INTERNAL)
  2  usage: bad flags or values, a file that cannot be read
  3  NOT_FOUND: no VM with that id
  4  INVALID_ARGUMENT (or OUT_OF_RANGE): the manager refused a request field
  5  UNAVAILABLE: the manager cannot be reached (not running, connection refused, TLS failure)
  6  DEADLINE_EXCEEDED: no answer within the timeout, or the agent not ready within --wait-timeout

Errors are one line on stderr: `managerctl: <what> failed: <GRPC_CODE>: <message>`.
`logs -f` and `events` run until Ctrl-C (SIGINT) or until the manager ends the
stream (`logs -f`: the VM was removed), and then exit 0.";

#[derive(Debug, Parser)]
#[command(
    name = "managerctl",
    version,
    about = "Command-line client of the Cocos manager (manager.ManagerService and cocos.manager.v1.Operator)",
    after_help = EXIT_CODES_HELP
)]
pub struct Cli {
    #[command(flatten)]
    pub conn: Connection,

    /// Output format: a table for people, JSON for scripts (one document on
    /// stdout; `logs` and `events`: one object per line)
    #[arg(
        long,
        short = 'o',
        value_enum,
        default_value_t = Output::Table,
        global = true,
        help_heading = "Output"
    )]
    pub output: Output,

    #[command(subcommand)]
    pub command: Command,
}

/// Where the manager is and how to reach it. Empty values count as unset, as
/// in the Cocos CLI.
#[derive(Debug, Args)]
pub struct Connection {
    /// Manager address, host:port or http(s)://host:port [default: localhost:7001]
    #[arg(
        long = "grpc-url",
        visible_alias = "url",
        env = "MANAGER_GRPC_URL",
        global = true,
        help_heading = "Connection",
        value_name = "ADDRESS"
    )]
    pub grpc_url: Option<String>,

    /// Bound of each request, a Go duration such as 60s or 1m30s [default: 60s]
    #[arg(
        long = "grpc-timeout",
        visible_alias = "timeout",
        env = "MANAGER_GRPC_TIMEOUT",
        global = true,
        help_heading = "Connection",
        value_name = "DURATION"
    )]
    pub grpc_timeout: Option<String>,

    /// CA certificate(s) (PEM) of the manager's TLS certificate; set = TLS
    #[arg(
        long = "grpc-server-ca-certs",
        env = "MANAGER_GRPC_SERVER_CA_CERTS",
        global = true,
        help_heading = "Connection",
        value_name = "FILE"
    )]
    pub grpc_server_ca_certs: Option<String>,

    /// Client certificate (PEM) for mutual TLS (with --grpc-client-key)
    #[arg(
        long = "grpc-client-cert",
        env = "MANAGER_GRPC_CLIENT_CERT",
        global = true,
        help_heading = "Connection",
        value_name = "FILE"
    )]
    pub grpc_client_cert: Option<String>,

    /// Client private key (PEM) for mutual TLS (with --grpc-client-cert)
    #[arg(
        long = "grpc-client-key",
        env = "MANAGER_GRPC_CLIENT_KEY",
        global = true,
        help_heading = "Connection",
        value_name = "FILE"
    )]
    pub grpc_client_key: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a VM (CreateVm); the flags are the Cocos CLI's `create-vm` flags
    Create(Box<Create>),
    /// Remove a VM (RemoveVm)
    Remove {
        /// The VM's id
        id: String,
    },
    /// List the VMs (ListVms)
    List,
    /// Show a VM: state, process, launch configuration, command line (GetVm;
    /// CVMInfo from a manager without the operator's service)
    Info {
        /// The VM's id
        id: String,
        /// List every manager setting in force at the create in the table
        /// (JSON always has them)
        #[arg(long)]
        settings: bool,
    },
    /// Print a VM's console log, or QEMU's own log (StreamLogs)
    Logs(LogsArgs),
    /// Follow lifecycle events, of all VMs or of one (WatchEvents); it
    /// opens with the current state of each VM
    Events {
        /// Only this VM's events (the stream ends when it is removed)
        id: Option<String>,
    },
    /// Print a VM's attestation policy JSON (AttestationPolicy)
    Policy {
        /// The VM's id
        id: String,
    },
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The VM's id
    pub id: String,
    /// Keep following: print new lines as they come, until Ctrl-C or the VM
    /// is removed
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// How many of the last lines to print first: a number, or `all` (at
    /// most 100000, the most the manager sends)
    #[arg(long, default_value = "all", value_name = "N", value_parser = parse_tail)]
    pub tail: u32,
    /// QEMU's own log (its stderr) instead of the guest's serial console
    #[arg(long)]
    pub qemu: bool,
}

/// What `--tail all` asks for: the most lines the manager sends for one
/// request (it refuses more with INVALID_ARGUMENT).
pub const TAIL_ALL: u32 = 100_000;

/// `--tail`: `all` (every line the manager kept, up to [`TAIL_ALL`]) or a
/// count.
fn parse_tail(text: &str) -> Result<u32, String> {
    if text.eq_ignore_ascii_case("all") {
        return Ok(TAIL_ALL);
    }
    text.parse::<u32>()
        .map_err(|_| format!("{text:?} is neither a number of lines nor `all`"))
}

#[derive(Debug, Args)]
pub struct Create {
    /// URL of the computation server the agent connects to
    #[arg(long)]
    pub server_url: Option<String>,
    /// CA certificate file (PEM) of the computation server
    #[arg(long, value_name = "FILE")]
    pub server_ca: Option<PathBuf>,
    /// Client private key file (PEM) the agent presents to the server (never printed)
    #[arg(long, value_name = "FILE")]
    pub client_key: Option<PathBuf>,
    /// Client certificate file (PEM) the agent presents to the server
    #[arg(long, value_name = "FILE")]
    pub client_crt: Option<PathBuf>,
    /// URL of the certificate authority the agent gets its certificate from
    #[arg(long)]
    pub ca_url: Option<String>,
    /// Agent log level (debug, info, warn, error)
    #[arg(long)]
    pub log_level: Option<String>,
    /// Time to live of the VM, a Go duration (e.g. 1h); empty = none
    #[arg(long)]
    pub ttl: Option<String>,
    /// AWS access key id for the agent's S3 access
    #[arg(long)]
    pub aws_access_key_id: Option<String>,
    /// AWS secret access key (never printed)
    #[arg(long, hide_env_values = true)]
    pub aws_secret_access_key: Option<String>,
    /// AWS (or S3-compatible) endpoint URL
    #[arg(long)]
    pub aws_endpoint_url: Option<String>,
    /// AWS region
    #[arg(long)]
    pub aws_region: Option<String>,
    /// Attestation agent KBS parameters
    #[arg(long)]
    pub aa_kbs_params: Option<String>,
    /// Token the agent uses to obtain its certificate (never printed)
    #[arg(long)]
    pub certs_token: Option<String>,
    /// Wait until the guest agent answers GET /health on the forwarded port
    #[arg(long)]
    pub wait: bool,
    /// Bound of --wait, a Go duration
    #[arg(long, default_value = "5m", value_name = "DURATION")]
    pub wait_timeout: String,
    /// Host the agent's forwarded port is reached on [default: the manager's host]
    #[arg(long, value_name = "HOST")]
    pub wait_host: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn create_flags_and_connection_flags_do_not_collide() {
        let cli = Cli::try_parse_from([
            "managerctl",
            "create",
            "--client-key",
            "agent.key",
            "--grpc-client-key",
            "tls.key",
            "--client-crt",
            "agent.crt",
            "--grpc-client-cert",
            "tls.crt",
            "-o",
            "json",
        ])
        .expect("parses");
        assert_eq!(cli.conn.grpc_client_key.as_deref(), Some("tls.key"));
        assert_eq!(cli.conn.grpc_client_cert.as_deref(), Some("tls.crt"));
        assert_eq!(cli.output, Output::Json);
        let Command::Create(create) = cli.command else {
            panic!("create")
        };
        assert_eq!(create.client_key, Some(PathBuf::from("agent.key")));
        assert_eq!(create.client_crt, Some(PathBuf::from("agent.crt")));
    }

    #[test]
    fn logs_flags() {
        let cli = Cli::try_parse_from(["managerctl", "logs", "vm-1", "-f", "--tail", "20"])
            .expect("parses");
        let Command::Logs(logs) = cli.command else {
            panic!("logs")
        };
        assert_eq!(logs.id, "vm-1");
        assert!(logs.follow && !logs.qemu);
        assert_eq!(logs.tail, 20);
        let cli = Cli::try_parse_from(["managerctl", "logs", "--qemu", "vm-1"]).expect("parses");
        let Command::Logs(logs) = cli.command else {
            panic!("logs")
        };
        assert!(logs.qemu && !logs.follow);
        assert_eq!(logs.tail, TAIL_ALL, "all by default");
        assert!(Cli::try_parse_from(["managerctl", "logs", "vm-1", "--tail", "-3"]).is_err());
        assert!(Cli::try_parse_from(["managerctl", "logs"]).is_err());
    }

    #[test]
    fn events_take_an_optional_id() {
        let cli = Cli::try_parse_from(["managerctl", "events"]).expect("parses");
        assert!(matches!(cli.command, Command::Events { id: None }));
        let cli =
            Cli::try_parse_from(["managerctl", "-o", "json", "events", "vm-1"]).expect("parses");
        assert!(matches!(cli.command, Command::Events { id: Some(ref id) } if id == "vm-1"));
        assert!(matches!(
            Cli::try_parse_from(["managerctl", "list"])
                .expect("parses")
                .command,
            Command::List
        ));
    }
}
