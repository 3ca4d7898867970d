//! The QMP protocol as QEMU 7.2 speaks it: a greeting, capabilities
//! negotiation, then one JSON reply per command (echoing its `id`) and
//! asynchronous events. Output uses QEMU's spacing and `\r\n` line ends.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// The VM's run state, as `query-status` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Prelaunch,
    Running,
    Paused,
    GuestPanicked,
}

impl RunState {
    pub fn name(self) -> &'static str {
        match self {
            RunState::Prelaunch => "prelaunch",
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::GuestPanicked => "guest-panicked",
        }
    }
}

/// What a command asks of the VM, after its reply is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    Nothing,
    Powerdown,
    Quit,
    Stop,
    Cont,
}

pub const GREETING: &str =
    "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 7}, \
\"package\": \"qemu-stand-in\"}, \"capabilities\": []}}\r\n";

/// One client's session: commands are refused until `qmp_capabilities`.
#[derive(Debug, Default)]
pub struct Session {
    pub negotiated: bool,
}

/// What a command sees of the VM.
pub struct Vm<'a> {
    pub state: RunState,
    pub name: Option<&'a str>,
}

impl Session {
    /// Answers one input object; returns the reply line and the effect.
    pub fn execute(&mut self, input: &Value, vm: &Vm<'_>) -> (String, Effect) {
        let id = input.get("id");
        match self.check(input, vm) {
            Ok((body, effect)) => (reply(&format!("\"return\": {body}"), id), effect),
            Err((class, desc)) => (error(class, &desc, id), Effect::Nothing),
        }
    }

    fn check(
        &mut self,
        input: &Value,
        vm: &Vm<'_>,
    ) -> Result<(String, Effect), (&'static str, String)> {
        let generic = |desc: &str| ("GenericError", desc.to_string());
        let Some(object) = input.as_object() else {
            return Err(generic("QMP input must be a JSON object"));
        };
        for key in object.keys() {
            if !matches!(key.as_str(), "execute" | "arguments" | "id") {
                return Err(generic(&format!("QMP input member '{key}' is unexpected")));
            }
        }
        let command = match object.get("execute") {
            None => return Err(generic("QMP input lacks member 'execute'")),
            Some(Value::String(command)) => command.as_str(),
            Some(_) => return Err(generic("QMP input member 'execute' must be a string")),
        };
        if let Some(arguments) = object.get("arguments") {
            if !arguments.is_object() {
                return Err(generic("QMP input member 'arguments' must be an object"));
            }
        }
        let not_found = |desc: String| ("CommandNotFound", desc);
        if !self.negotiated {
            if command == "qmp_capabilities" {
                self.negotiated = true;
                return Ok(("{}".into(), Effect::Nothing));
            }
            return Err(not_found(
                "Expecting capabilities negotiation with 'qmp_capabilities'".into(),
            ));
        }
        let empty = |effect| Ok(("{}".to_string(), effect));
        match command {
            "qmp_capabilities" => Err(not_found(
                "Capabilities negotiation is already complete, command ignored".into(),
            )),
            "query-status" => Ok((
                format!(
                    "{{\"status\": \"{}\", \"singlestep\": false, \"running\": {}}}",
                    vm.state.name(),
                    vm.state == RunState::Running
                ),
                Effect::Nothing,
            )),
            "query-version" => Ok((
                "{\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 7}, \"package\": \"qemu-stand-in\"}"
                    .into(),
                Effect::Nothing,
            )),
            "query-name" => Ok((
                match vm.name {
                    Some(name) => format!("{{\"name\": {}}}", json_string(name)),
                    None => "{}".into(),
                },
                Effect::Nothing,
            )),
            "system_powerdown" => empty(Effect::Powerdown),
            "quit" => empty(Effect::Quit),
            "stop" => empty(Effect::Stop),
            "cont" => empty(Effect::Cont),
            other => Err(not_found(format!("The command {other} has not been found"))),
        }
    }
}

fn reply(body: &str, id: Option<&Value>) -> String {
    let mut line = format!("{{{body}");
    if let Some(id) = id {
        line.push_str(", \"id\": ");
        write_json(id, &mut line);
    }
    line.push_str("}\r\n");
    line
}

/// An error reply.
pub fn error(class: &str, desc: &str, id: Option<&Value>) -> String {
    reply(
        &format!(
            "\"error\": {{\"class\": \"{class}\", \"desc\": {}}}",
            json_string(desc)
        ),
        id,
    )
}

/// An event line; `data` is JSON text.
pub fn event(name: &str, data: Option<&str>) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mut line = format!(
        "{{\"timestamp\": {{\"seconds\": {}, \"microseconds\": {}}}, \"event\": \"{name}\"",
        now.as_secs(),
        now.subsec_micros()
    );
    if let Some(data) = data {
        let _ = write!(line, ", \"data\": {data}");
    }
    line.push_str("}\r\n");
    line
}

/// SHUTDOWN's data.
pub fn shutdown_data(guest: bool, reason: &str) -> String {
    format!("{{\"guest\": {guest}, \"reason\": \"{reason}\"}}")
}

fn json_string(s: &str) -> String {
    Value::String(s.to_string()).to_string()
}

/// JSON with QEMU's separators (`": "` and `", "`).
fn write_json(value: &Value, out: &mut String) {
    match value {
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_json(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(&json_string(key));
                out.push_str(": ");
                write_json(item, out);
            }
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(session: &mut Session, input: Value) -> (Value, Effect) {
        let vm = Vm {
            state: RunState::Running,
            name: Some("cocos-x"),
        };
        let (line, effect) = session.execute(&input, &vm);
        assert!(line.ends_with("}\r\n"), "{line:?}");
        (serde_json::from_str(&line).unwrap(), effect)
    }

    #[test]
    fn negotiation_then_commands_with_ids() {
        let mut s = Session::default();
        let (r, _) = run(&mut s, json!({"execute": "query-status"}));
        assert_eq!(r["error"]["class"], "CommandNotFound");
        assert_eq!(
            r["error"]["desc"],
            "Expecting capabilities negotiation with 'qmp_capabilities'"
        );
        let (r, _) = run(&mut s, json!({"execute": "qmp_capabilities", "id": 1}));
        assert_eq!(r, json!({"return": {}, "id": 1}));
        let (r, _) = run(
            &mut s,
            json!({"execute": "query-status", "id": {"a": [1, "b"]}}),
        );
        assert_eq!(
            r,
            json!({"return": {"status": "running", "singlestep": false, "running": true}, "id": {"a": [1, "b"]}})
        );
        let (r, e) = run(&mut s, json!({"execute": "system_powerdown"}));
        assert_eq!((r, e), (json!({"return": {}}), Effect::Powerdown));
        let (r, e) = run(&mut s, json!({"execute": "quit", "id": "q"}));
        assert_eq!((r, e), (json!({"return": {}, "id": "q"}), Effect::Quit));
        let (r, _) = run(&mut s, json!({"execute": "frobnicate", "id": 7}));
        assert_eq!(
            r,
            json!({"error": {"class": "CommandNotFound", "desc": "The command frobnicate has not been found"}, "id": 7})
        );
        let (r, _) = run(&mut s, json!([1]));
        assert_eq!(r["error"]["class"], "GenericError");
        let (r, _) = run(&mut s, json!({"execute": "query-name"}));
        assert_eq!(r, json!({"return": {"name": "cocos-x"}}));
    }

    #[test]
    fn greeting_and_events_parse_with_qemus_spacing() {
        let g: Value = serde_json::from_str(GREETING).unwrap();
        assert_eq!(g["QMP"]["version"]["qemu"]["major"], 7);
        let line = event("SHUTDOWN", Some(&shutdown_data(true, "guest-shutdown")));
        let e: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(e["event"], "SHUTDOWN");
        assert_eq!(
            e["data"],
            json!({"guest": true, "reason": "guest-shutdown"})
        );
        assert!(e["timestamp"]["seconds"].as_u64().unwrap() > 1_600_000_000);
        assert!(line.contains("\"data\": {\"guest\": true, \"reason\": \"guest-shutdown\"}"));
    }
}
