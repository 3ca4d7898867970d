//! How the operator's service (`cocos.manager.v1.Operator`) is shown: VM
//! rows and their JSON, `info` pairs, event lines and log lines. Pure (time
//! is passed in where it matters), so every shape a script or a person reads
//! is a unit test here rather than something found out against a daemon.

use std::collections::BTreeMap;

use cocos_core::duration::civil_from_days;
use cocos_core::operator_proto::{
    EventKind, GetVmResponse, LaunchConfig, LogLine, LogSource, TeeMode, Vm, VmEvent, VmState,
};
use serde_json::{json, Map, Value};

/// Shown in a table cell that has no value.
pub const NONE: &str = "-";

/// The lower-case name of a proto enum value: its proto name without the
/// enum's prefix (`VM_STATE_RUNNING` → `running`); a value this client does
/// not know (a newer manager) is `unknown(N)`.
fn enum_name(prefix: &str, proto_name: Option<&'static str>, value: i32) -> String {
    match proto_name {
        Some(name) => name
            .strip_prefix(prefix)
            .unwrap_or(name)
            .to_ascii_lowercase(),
        None => format!("unknown({value})"),
    }
}

pub fn state_name(value: i32) -> String {
    let name = VmState::try_from(value).ok().map(|s| s.as_str_name());
    enum_name("VM_STATE_", name, value)
}

pub fn tee_name(value: i32) -> String {
    let name = TeeMode::try_from(value).ok().map(|t| t.as_str_name());
    enum_name("TEE_MODE_", name, value)
}

pub fn kind_name(value: i32) -> String {
    let name = EventKind::try_from(value).ok().map(|k| k.as_str_name());
    enum_name("EVENT_KIND_", name, value)
}

pub fn source_name(value: i32) -> String {
    let name = LogSource::try_from(value).ok().map(|s| s.as_str_name());
    enum_name("LOG_SOURCE_", name, value)
}

/// A duration for a table cell, to the two largest units: `45s`, `12m5s`,
/// `3h12m`, `2d3h`. Below a second it is `0s`.
pub fn short_duration(ms: u64) -> String {
    let secs = ms / 1000;
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d{h}h")
    } else if h > 0 {
        format!("{h}h{m}m")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

/// Unix milliseconds as RFC 3339 in UTC with milliseconds:
/// `2024-05-01T12:03:04.005Z`.
pub fn utc_time(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX / 2);
    let rest = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60,
        unix_ms % 1000
    )
}

fn or_none(text: &str) -> String {
    if text.is_empty() {
        NONE.to_string()
    } else {
        text.to_string()
    }
}

fn positive<T: PartialOrd + Default + ToString>(value: T) -> String {
    if value > T::default() {
        value.to_string()
    } else {
        NONE.to_string()
    }
}

/// The columns of `list`.
pub const LIST_HEADERS: [&str; 10] = [
    "ID",
    "STATE",
    "PID",
    "PORT",
    "TEE",
    "VTPM",
    "RESTARTS",
    "UPTIME",
    "TTL LEFT",
    "LAST EXIT",
];

/// One row of `list`.
pub fn vm_row(vm: &Vm) -> Vec<String> {
    vec![
        vm.id.clone(),
        state_name(vm.state),
        positive(vm.pid),
        positive(vm.port),
        tee_name(vm.tee),
        if vm.vtpm { "yes" } else { "no" }.to_string(),
        vm.restarts.to_string(),
        if vm.pid > 0 {
            short_duration(vm.uptime_ms)
        } else {
            NONE.to_string()
        },
        vm.ttl_left_ms
            .map(short_duration)
            .unwrap_or_else(|| NONE.to_string()),
        or_none(&vm.last_exit),
    ]
}

/// Aligned columns, two spaces apart; the last column is not padded.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                let pad = widths[i].saturating_sub(cell.chars().count());
                out.push_str(cell);
                out.push_str(&" ".repeat(pad + 2));
            }
        }
        out
    };
    let mut lines = vec![line(headers.to_vec())];
    for row in rows {
        lines.push(line(row.iter().map(String::as_str).collect()));
    }
    lines.join("\n")
}

/// A VM as JSON: absent values are `null` (no process: `pid` and `port`
/// null, `uptime_ms` 0; no TTL: `ttl_left_ms` null; never exited:
/// `last_exit` null).
pub fn vm_json(vm: &Vm) -> Value {
    json!({
        "id": vm.id,
        "state": state_name(vm.state),
        "pid": (vm.pid > 0).then_some(vm.pid),
        "port": (vm.port > 0).then_some(vm.port),
        "tee": tee_name(vm.tee),
        "vtpm": vm.vtpm,
        "restarts": vm.restarts,
        "created_unix_ms": vm.created_unix_ms,
        "created": utc_time(vm.created_unix_ms),
        "uptime_ms": vm.uptime_ms,
        "ttl_left_ms": vm.ttl_left_ms,
        "last_exit": (!vm.last_exit.is_empty()).then(|| vm.last_exit.clone()),
        "readopted": vm.readopted,
    })
}

/// `list -o json`: `{"vms": [...]}`.
pub fn list_json(vms: &[Vm]) -> Value {
    json!({ "vms": vms.iter().map(vm_json).collect::<Vec<_>>() })
}

fn launch_json(launch: &LaunchConfig) -> Value {
    let settings: BTreeMap<&String, &String> = launch.settings.iter().collect();
    json!({
        "ovmf_version": launch.ovmf_version,
        "cpu_num": launch.cpu_num,
        "cpu_type": launch.cpu_type,
        "kernel_cmd": launch.kernel_cmd,
        "eos_version": launch.eos_version,
        "aa_kbs_params": launch.aa_kbs_params,
        "settings": settings,
        "host_data": launch.host_data,
        "measurement": launch.measurement,
    })
}

/// `info -o json` from `GetVm`: the VM's fields, the `CVMInfo` keys at the
/// top level as well (so a script written for a Cocos manager reads the
/// same keys), the whole launch configuration under `launch`, QEMU's
/// command line as an array, and `"api": "operator"`.
pub fn info_json(id: &str, got: &GetVmResponse) -> Value {
    let mut doc = match &got.vm {
        Some(vm) => vm_json(vm),
        None => json!({ "id": id }),
    };
    let launch = got.launch.clone().unwrap_or_default();
    if let Value::Object(map) = &mut doc {
        map.insert("ovmf_version".into(), json!(launch.ovmf_version));
        map.insert("cpu_num".into(), json!(launch.cpu_num));
        map.insert("cpu_type".into(), json!(launch.cpu_type));
        map.insert("kernel_cmd".into(), json!(launch.kernel_cmd));
        map.insert("eos_version".into(), json!(launch.eos_version));
        map.insert("launch".into(), launch_json(&launch));
        map.insert("command_line".into(), json!(got.command_line));
        map.insert("api".into(), json!("operator"));
    }
    doc
}

/// A word as a POSIX shell reads it back: bare when it is safe, else in
/// single quotes.
pub fn shell_word(word: &str) -> String {
    let safe = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_@%+=:,./-".contains(c));
    if safe {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// `info` from `GetVm`, as label/value pairs. The manager settings (a
/// hundred or so) are listed with `all_settings`, else counted.
pub fn info_pairs(
    id: &str,
    got: &GetVmResponse,
    all_settings: bool,
) -> Vec<(&'static str, String)> {
    let mut rows = Vec::new();
    match &got.vm {
        Some(vm) => {
            let row = vm_row(vm);
            rows.extend([
                ("ID", vm.id.clone()),
                ("STATE", row[1].clone()),
                ("PID", row[2].clone()),
                ("PORT", row[3].clone()),
                ("TEE", row[4].clone()),
                ("VTPM", row[5].clone()),
                ("RESTARTS", row[6].clone()),
                ("CREATED", utc_time(vm.created_unix_ms)),
                ("UPTIME", row[7].clone()),
                ("TTL LEFT", row[8].clone()),
                ("LAST EXIT", row[9].clone()),
                ("READOPTED", if vm.readopted { "yes" } else { "no" }.into()),
            ]);
        }
        None => rows.push(("ID", id.to_string())),
    }
    let launch = got.launch.clone().unwrap_or_default();
    let settings: BTreeMap<&String, &String> = launch.settings.iter().collect();
    let settings = if all_settings || settings.is_empty() {
        let lines: Vec<String> = settings.iter().map(|(k, v)| format!("{k}={v}")).collect();
        lines.join("\n")
    } else {
        format!("{} (--settings lists them)", settings.len())
    };
    rows.extend([
        ("OVMF VERSION", or_none(&launch.ovmf_version)),
        ("CPUS", launch.cpu_num.to_string()),
        ("CPU TYPE", or_none(&launch.cpu_type)),
        ("KERNEL CMDLINE", or_none(&launch.kernel_cmd)),
        ("EOS VERSION", or_none(&launch.eos_version)),
        ("AA KBS PARAMS", or_none(&launch.aa_kbs_params)),
        ("HOST DATA", or_none(&launch.host_data)),
        ("MEASUREMENT", or_none(&launch.measurement)),
        ("SETTINGS", or_none(&settings)),
        (
            "COMMAND LINE",
            or_none(
                &got.command_line
                    .iter()
                    .map(|w| shell_word(w))
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
        ),
    ]);
    rows
}

/// A two-column table of fields; a value of several lines continues under
/// its first line.
pub fn pairs(rows: &[(&str, String)]) -> String {
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out: Vec<String> = Vec::new();
    for (key, value) in rows {
        let mut lines = value.lines();
        out.push(format!(
            "{key:<width$}  {}",
            lines.next().unwrap_or_default()
        ));
        for more in lines {
            out.push(format!("{:width$}  {more}", ""));
        }
    }
    out.join("\n")
}

/// The VM part of an event line: `state=running pid=1234 port=6100`.
fn vm_summary(vm: &Vm) -> String {
    let mut parts = vec![format!("state={}", state_name(vm.state))];
    if vm.pid > 0 {
        parts.push(format!("pid={}", vm.pid));
    }
    if vm.port > 0 {
        parts.push(format!("port={}", vm.port));
    }
    if vm.restarts > 0 {
        parts.push(format!("restarts={}", vm.restarts));
    }
    parts.join(" ")
}

/// Width of the KIND column of event lines (`ttl_expired`).
const KIND_WIDTH: usize = 11;

/// One event as a line for people: time, kind, VM id, what happened.
/// SYNCED says that live events follow; LAGGED says how many were lost.
pub fn event_line(event: &VmEvent) -> String {
    let kind = EventKind::try_from(event.kind).ok();
    let name = kind_name(event.kind);
    let id = if event.id.is_empty() {
        NONE
    } else {
        event.id.as_str()
    };
    let vm = event.vm.as_ref().map(vm_summary);
    let what = match kind {
        Some(EventKind::Synced) => {
            "end of the current state (one line per VM above); live events follow".to_string()
        }
        Some(EventKind::Lagged) => format!(
            "LAGGED: this watcher fell behind and {} events were lost (not shown)",
            event.lagged
        ),
        Some(EventKind::Exited) => {
            let mut text = or_none(&event.detail);
            if !event.exit_cause.is_empty() {
                text.push_str(&format!(" ({})", event.exit_cause));
            }
            text
        }
        Some(EventKind::Restarting) => format!(
            "attempt {} in {}",
            event.attempt,
            cocos_core::duration::format_go_duration(std::time::Duration::from_millis(
                event.delay_ms
            ))
        ),
        _ => event.detail.clone(),
    };
    let text = [what, vm.unwrap_or_default()]
        .into_iter()
        .filter(|t| !t.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    format!(
        "{}  {name:<KIND_WIDTH$}  {id}  {text}",
        utc_time(event.unix_ms)
    )
    .trim_end()
    .to_string()
}

/// One event as a JSON object (one per line with `-o json`): always
/// `sequence`, `unix_ms`, `time`, `kind`, `id` (null for SYNCED and
/// LAGGED), `vm` (null when none) and `detail`; EXITED adds `exit_code`,
/// `exit_signal` and `exit_cause`, RESTARTING `attempt` and `delay_ms`,
/// LAGGED `lagged`.
pub fn event_json(event: &VmEvent) -> Value {
    let mut map = Map::new();
    map.insert("sequence".into(), json!(event.sequence));
    map.insert("unix_ms".into(), json!(event.unix_ms));
    map.insert("time".into(), json!(utc_time(event.unix_ms)));
    map.insert("kind".into(), json!(kind_name(event.kind)));
    map.insert(
        "id".into(),
        json!((!event.id.is_empty()).then(|| event.id.clone())),
    );
    map.insert(
        "vm".into(),
        event.vm.as_ref().map(vm_json).unwrap_or(Value::Null),
    );
    map.insert("detail".into(), json!(event.detail));
    match EventKind::try_from(event.kind) {
        Ok(EventKind::Exited) => {
            map.insert("exit_code".into(), json!(event.exit_code));
            map.insert("exit_signal".into(), json!(event.exit_signal));
            map.insert("exit_cause".into(), json!(event.exit_cause));
        }
        Ok(EventKind::Restarting) => {
            map.insert("attempt".into(), json!(event.attempt));
            map.insert("delay_ms".into(), json!(event.delay_ms));
        }
        Ok(EventKind::Lagged) => {
            map.insert("lagged".into(), json!(event.lagged));
        }
        _ => {}
    }
    Value::Object(map)
}

/// A log line as JSON: `{"source":"console","line":"…"}` (bytes that are
/// not UTF-8 become U+FFFD).
pub fn log_json(line: &LogLine) -> Value {
    json!({
        "source": source_name(line.source),
        "line": String::from_utf8_lossy(&line.line),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm() -> Vm {
        Vm {
            id: "e71cdcf5-21c0-4e1d-9471-ac6b4389d5f3".into(),
            state: VmState::Running as i32,
            pid: 4242,
            port: 6100,
            tee: TeeMode::SevSnp as i32,
            vtpm: true,
            restarts: 2,
            created_unix_ms: 1_714_564_984_005,
            uptime_ms: 3_725_000,
            ttl_left_ms: Some(59_000),
            last_exit: "killed by SIGKILL (crash)".into(),
            readopted: false,
        }
    }

    #[test]
    fn enum_names_are_lower_case_without_prefix() {
        assert_eq!(state_name(VmState::Running as i32), "running");
        assert_eq!(state_name(99), "unknown(99)");
        assert_eq!(tee_name(TeeMode::SevSnpIgvm as i32), "sev_snp_igvm");
        assert_eq!(tee_name(TeeMode::None as i32), "none");
        assert_eq!(kind_name(EventKind::TtlExpired as i32), "ttl_expired");
        assert_eq!(kind_name(EventKind::Lagged as i32), "lagged");
        assert_eq!(source_name(LogSource::Qemu as i32), "qemu");
    }

    #[test]
    fn durations_to_two_units() {
        assert_eq!(short_duration(0), "0s");
        assert_eq!(short_duration(999), "0s");
        assert_eq!(short_duration(45_000), "45s");
        assert_eq!(short_duration(725_000), "12m5s");
        assert_eq!(short_duration(3_725_000), "1h2m");
        assert_eq!(short_duration(2 * 86_400_000 + 3 * 3_600_000 + 5), "2d3h");
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(utc_time(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc_time(1_714_564_984_005), "2024-05-01T12:03:04.005Z");
        assert_eq!(utc_time(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(utc_time(4_102_444_799_999), "2099-12-31T23:59:59.999Z");
    }

    #[test]
    fn list_rows_and_table() {
        let mut stopped = vm();
        stopped.id = "b".into();
        stopped.state = VmState::Failed as i32;
        stopped.pid = 0;
        stopped.port = 0;
        stopped.vtpm = false;
        stopped.ttl_left_ms = None;
        stopped.last_exit.clear();
        assert_eq!(
            vm_row(&vm()),
            [
                "e71cdcf5-21c0-4e1d-9471-ac6b4389d5f3",
                "running",
                "4242",
                "6100",
                "sev_snp",
                "yes",
                "2",
                "1h2m",
                "59s",
                "killed by SIGKILL (crash)"
            ]
        );
        assert_eq!(
            vm_row(&stopped),
            ["b", "failed", "-", "-", "sev_snp", "no", "2", "-", "-", "-"]
        );
        let text = table(
            &["ID", "STATE", "LAST"],
            &[
                vec!["a".into(), "running".into(), "x".into()],
                vec!["bbbb".into(), "up".into(), "".into()],
            ],
        );
        assert_eq!(
            text,
            "ID    STATE    LAST\na     running  x\nbbbb  up       "
        );
        assert_eq!(table(&LIST_HEADERS, &[]).lines().count(), 1);
    }

    #[test]
    fn vm_json_shape() {
        let doc = vm_json(&vm());
        assert_eq!(doc["state"], "running");
        assert_eq!(doc["pid"], 4242);
        assert_eq!(doc["port"], 6100);
        assert_eq!(doc["tee"], "sev_snp");
        assert_eq!(doc["vtpm"], true);
        assert_eq!(doc["ttl_left_ms"], 59_000);
        assert_eq!(doc["created"], "2024-05-01T12:03:04.005Z");
        assert_eq!(doc["last_exit"], "killed by SIGKILL (crash)");
        let mut none = vm();
        none.pid = 0;
        none.port = 0;
        none.ttl_left_ms = None;
        none.last_exit.clear();
        let doc = vm_json(&none);
        for key in ["pid", "port", "ttl_left_ms", "last_exit"] {
            assert!(doc[key].is_null(), "{key}: {doc}");
        }
        let list = list_json(&[vm(), none]);
        assert_eq!(list["vms"].as_array().map(Vec::len), Some(2));
    }

    fn got() -> GetVmResponse {
        let mut launch = LaunchConfig {
            ovmf_version: "edk2-stable202408".into(),
            cpu_num: 2,
            cpu_type: "EPYC-v4".into(),
            kernel_cmd: "console=ttyS0 quiet".into(),
            eos_version: String::new(),
            aa_kbs_params: "type=sample".into(),
            host_data: "qg==".into(),
            measurement: String::new(),
            ..Default::default()
        };
        launch
            .settings
            .insert("MANAGER_QEMU_MEMORY_SIZE".into(), "2048M".into());
        launch
            .settings
            .insert("MANAGER_QEMU_ENABLE_SEV_SNP".into(), "true".into());
        GetVmResponse {
            vm: Some(vm()),
            launch: Some(launch),
            command_line: vec![
                "/usr/bin/qemu-system-x86_64".into(),
                "-append".into(),
                "console=ttyS0 quiet".into(),
                "-name".into(),
                "it's".into(),
            ],
        }
    }

    #[test]
    fn info_json_keeps_the_cvminfo_keys_and_adds_the_rest() {
        let doc = info_json("x", &got());
        assert_eq!(doc["id"], "e71cdcf5-21c0-4e1d-9471-ac6b4389d5f3");
        assert_eq!(doc["state"], "running");
        assert_eq!(doc["cpu_num"], 2);
        assert_eq!(doc["kernel_cmd"], "console=ttyS0 quiet");
        assert_eq!(doc["launch"]["cpu_type"], "EPYC-v4");
        assert_eq!(doc["launch"]["aa_kbs_params"], "type=sample");
        assert_eq!(
            doc["launch"]["settings"]["MANAGER_QEMU_MEMORY_SIZE"],
            "2048M"
        );
        assert_eq!(doc["command_line"][0], "/usr/bin/qemu-system-x86_64");
        assert_eq!(doc["api"], "operator");
        let bare = info_json("x", &GetVmResponse::default());
        assert_eq!(bare["id"], "x");
        assert_eq!(bare["command_line"], json!([]));
    }

    #[test]
    fn info_pairs_show_settings_sorted_and_a_shell_command_line() {
        let text = pairs(&info_pairs("x", &got(), true));
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines
            .iter()
            .any(|l| l.starts_with("STATE") && l.ends_with("running")));
        assert!(lines
            .iter()
            .any(|l| l.starts_with("CPU TYPE") && l.ends_with("EPYC-v4")));
        assert!(lines
            .iter()
            .any(|l| l.starts_with("EOS VERSION") && l.ends_with(NONE)));
        let at = lines
            .iter()
            .position(|l| l.starts_with("SETTINGS"))
            .expect("settings");
        assert!(lines[at].ends_with("MANAGER_QEMU_ENABLE_SEV_SNP=true"));
        assert!(lines[at + 1]
            .trim_start()
            .starts_with("MANAGER_QEMU_MEMORY_SIZE=2048M"));
        assert!(lines[at + 1].starts_with("     "));
        assert!(lines.iter().any(|l| l.starts_with("COMMAND LINE")
            && l.ends_with(
                r"/usr/bin/qemu-system-x86_64 -append 'console=ttyS0 quiet' -name 'it'\''s'"
            )));
    }

    #[test]
    fn settings_are_counted_unless_asked_for() {
        let text = pairs(&info_pairs("x", &got(), false));
        let line = text
            .lines()
            .find(|l| l.starts_with("SETTINGS"))
            .expect("settings");
        assert!(line.ends_with("2 (--settings lists them)"), "{line}");
        assert!(!text.contains("MANAGER_QEMU_MEMORY_SIZE"));
        let mut none = got();
        none.launch = None;
        let text = pairs(&info_pairs("x", &none, false));
        assert!(text
            .lines()
            .any(|l| l.starts_with("SETTINGS") && l.ends_with(NONE)));
    }

    #[test]
    fn shell_words() {
        assert_eq!(shell_word("-m"), "-m");
        assert_eq!(shell_word("a,b=c:/d"), "a,b=c:/d");
        assert_eq!(shell_word(""), "''");
        assert_eq!(shell_word("a b"), "'a b'");
        assert_eq!(shell_word("$HOME"), "'$HOME'");
    }

    fn event(kind: EventKind) -> VmEvent {
        VmEvent {
            sequence: 7,
            unix_ms: 1_714_564_984_005,
            kind: kind as i32,
            id: "vm-1".into(),
            vm: Some(vm()),
            ..Default::default()
        }
    }

    #[test]
    fn event_lines() {
        assert_eq!(
            event_line(&event(EventKind::Running)),
            "2024-05-01T12:03:04.005Z  running      vm-1  state=running pid=4242 port=6100 restarts=2"
        );
        let mut exited = event(EventKind::Exited);
        exited.detail = "killed by SIGKILL".into();
        exited.exit_cause = "crash".into();
        assert!(event_line(&exited)
            .contains("exited       vm-1  killed by SIGKILL (crash) state=running"));
        let mut restarting = event(EventKind::Restarting);
        restarting.attempt = 3;
        restarting.delay_ms = 2500;
        assert!(event_line(&restarting).contains("restarting   vm-1  attempt 3 in 2.5s"));
        let lagged = VmEvent {
            kind: EventKind::Lagged as i32,
            lagged: 12,
            ..Default::default()
        };
        let line = event_line(&lagged);
        assert!(line.contains("lagged       -  LAGGED: "), "{line}");
        assert!(line.contains("12 events were lost"), "{line}");
        let synced = VmEvent {
            kind: EventKind::Synced as i32,
            ..Default::default()
        };
        assert!(event_line(&synced).contains("synced       -  end of the current state"));
        let mut removed = event(EventKind::Removed);
        removed.vm = None;
        assert_eq!(
            event_line(&removed),
            "2024-05-01T12:03:04.005Z  removed      vm-1"
        );
    }

    #[test]
    fn event_json_shape() {
        let doc = event_json(&event(EventKind::Created));
        assert_eq!(doc["kind"], "created");
        assert_eq!(doc["id"], "vm-1");
        assert_eq!(doc["sequence"], 7);
        assert_eq!(doc["time"], "2024-05-01T12:03:04.005Z");
        assert_eq!(doc["vm"]["state"], "running");
        assert!(doc.get("exit_code").is_none());
        let mut exited = event(EventKind::Exited);
        exited.exit_signal = Some(9);
        exited.exit_cause = "crash".into();
        let doc = event_json(&exited);
        assert!(doc["exit_code"].is_null());
        assert_eq!(doc["exit_signal"], 9);
        assert_eq!(doc["exit_cause"], "crash");
        let lagged = event_json(&VmEvent {
            kind: EventKind::Lagged as i32,
            lagged: 5,
            ..Default::default()
        });
        assert_eq!(lagged["kind"], "lagged");
        assert_eq!(lagged["lagged"], 5);
        assert!(lagged["id"].is_null() && lagged["vm"].is_null());
        let mut restarting = event(EventKind::Restarting);
        restarting.attempt = 1;
        restarting.delay_ms = 1000;
        let doc = event_json(&restarting);
        assert_eq!(
            (doc["attempt"].as_u64(), doc["delay_ms"].as_u64()),
            (Some(1), Some(1000))
        );
    }

    #[test]
    fn log_lines_as_json() {
        let line = LogLine {
            source: LogSource::Console as i32,
            line: b"Linux version 6.1 \xff".to_vec(),
        };
        let doc = log_json(&line);
        assert_eq!(doc["source"], "console");
        assert_eq!(doc["line"], "Linux version 6.1 \u{fffd}");
    }
}
