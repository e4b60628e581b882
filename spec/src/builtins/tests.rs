//! The builtin families against a recording [`TestHost`]: what each
//! builtin hands the runtime, what it returns to the spec, and what it
//! refuses. No runtime, no process: these run with the language alone.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use faultbox_agent::rule::{Action, Trigger};
use faultbox_proxy::rules::{ProxyAction, ProxyRuleDef};
use faultbox_proxy::steps::{Arg, StepCall, StepReply, StepResult};

use crate::event::Event;
use crate::host::{AssertionDetail, HostError, TestHost};
use crate::load::{BodyOutcome, Spec, load};
use crate::model::Healthcheck;
use crate::values::FaultValue;

/// Everything a test body asked of its host, in order.
#[derive(Debug, PartialEq)]
enum Call {
    Open {
        service: String,
        faults: Vec<(String, FaultValue)>,
        trace: bool,
    },
    Close(u64),
    OpenProxy {
        target: String,
        rules: Vec<ProxyRuleDef>,
    },
    CloseProxy(u64),
    Step(StepCall),
    Acknowledge(String),
    Partition(String),
    Release(String),
}

#[derive(Default)]
struct Recorder {
    calls: Mutex<Vec<Call>>,
    assertions: Mutex<(u64, Option<AssertionDetail>)>,
    events: Vec<Event>,
    /// How many events `events_after` has handed out.
    handed: Mutex<usize>,
    /// Whether every `events_after` finds one more event (of type `tick`).
    ticking: bool,
    reply: Option<StepReply>,
}

impl Recorder {
    fn push(&self, call: Call) {
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(call);
    }

    fn calls(&self) -> Vec<Call> {
        std::mem::take(&mut *self.calls.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn assertions(&self) -> (u64, Option<AssertionDetail>) {
        self.assertions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl TestHost for Recorder {
    fn open_window(
        &self,
        service: &str,
        faults: Vec<(String, FaultValue)>,
        trace: bool,
        _from_start: bool,
    ) -> Result<u64, HostError> {
        if service == "gone" {
            return Err(HostError::NotRunning {
                service: service.into(),
                state: "has exited",
            });
        }
        self.push(Call::Open {
            service: service.into(),
            faults,
            trace,
        });
        Ok(7)
    }
    fn close_window(&self, id: u64) -> Result<(), HostError> {
        self.push(Call::Close(id));
        Ok(())
    }
    fn latest_started_window(&self, _service: &str, _trace: bool) -> Option<u64> {
        Some(7)
    }
    fn open_proxy_window(
        &self,
        service: &str,
        interface: &str,
        rules: Vec<ProxyRuleDef>,
        _from_start: bool,
    ) -> Result<u64, HostError> {
        self.push(Call::OpenProxy {
            target: format!("{service}.{interface}"),
            rules,
        });
        Ok(8)
    }
    fn latest_started_proxy_window(&self, _service: &str, _interface: &str) -> Option<u64> {
        Some(8)
    }
    fn close_proxy_window(&self, id: u64) {
        self.push(Call::CloseProxy(id));
    }
    fn open_partition(&self, a: &str, b: &str) -> Result<u64, HostError> {
        self.push(Call::Partition(format!("{a}|{b}")));
        Ok(9)
    }
    fn close_partition(&self, id: u64) -> Result<(), HostError> {
        self.push(Call::Close(id));
        Ok(())
    }
    fn latest_partition(&self, _a: &str, _b: &str) -> Option<u64> {
        None
    }
    fn release(
        &self,
        tag: &str,
        deny: Option<i32>,
        limit: Option<u64>,
        _timeout: Duration,
    ) -> Result<u64, HostError> {
        if tag != "w" {
            return Err(HostError::UnknownTag {
                tag: tag.into(),
                known: "; in force: w".into(),
            });
        }
        self.push(Call::Release(format!("{tag} {deny:?} {limit:?}")));
        Ok(1)
    }
    fn count_assertion(&self) {
        self.assertions.lock().unwrap_or_else(|p| p.into_inner()).0 += 1;
    }
    fn record_assertion(&self, detail: AssertionDetail) {
        let mut a = self.assertions.lock().unwrap_or_else(|p| p.into_inner());
        a.1.get_or_insert(detail);
    }
    fn events(&self) -> Vec<Event> {
        self.events.clone()
    }
    fn events_after(&self, after: u64) -> Vec<Event> {
        if self.ticking {
            return vec![Event {
                seq: after + 1,
                time_ns: after + 1,
                kind: "tick".into(),
                service: "db".into(),
                fields: BTreeMap::new(),
                vector_clock: BTreeMap::new(),
            }];
        }
        let fresh: Vec<Event> = self
            .events
            .iter()
            .filter(|e| e.seq > after)
            .cloned()
            .collect();
        *self.handed.lock().unwrap_or_else(|p| p.into_inner()) += fresh.len();
        fresh
    }
    fn acknowledge_exit(&self, service: &str) {
        self.push(Call::Acknowledge(service.into()));
    }
    fn step(&self, call: &StepCall) -> StepResult {
        self.push(Call::Step(call.clone()));
        match &self.reply {
            Some(r) => StepResult::Reply(r.clone()),
            None => StepResult::Raise("no reply scripted".into()),
        }
    }
    fn proxy_addr(&self, _service: &str, _interface: &str) -> Option<String> {
        Some("127.0.0.1:40000".into())
    }
}

/// Loads `text` as a spec of its own directory.
fn spec(text: &str) -> (Spec, PathBuf) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "fb-builtins-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("spec.star");
    std::fs::write(&path, text).expect("write");
    (load(&path).unwrap_or_else(|e| panic!("{e}")), dir)
}

fn run(spec: &Spec, test: &str, host: &Arc<Recorder>) -> BodyOutcome {
    let as_host: Arc<dyn TestHost> = Arc::clone(host) as Arc<dyn TestHost>;
    spec.run_body(
        test,
        as_host,
        Duration::from_secs(10),
        &std::sync::atomic::AtomicBool::new(false),
    )
}

const DB: &str = r#"
db = service("db", "/bin/true", interface("main", "postgres", 5432),
             env = {"MODE": "x"}, healthcheck = tcp("localhost:5432", timeout = "3s"))
api = service("api", "/bin/true", interface("public", "http", 8080),
              depends_on = [db], healthcheck = http("http://localhost:8080/health"))
"#;

#[test]
fn topology_builtins_build_the_model_with_ports_env_dependencies_and_healthchecks() {
    let (s, _) = spec(DB);
    assert_eq!(s.services.len(), 2);
    let db = &s.services[0];
    assert_eq!((db.name.as_str(), db.binary.as_str()), ("db", "/bin/true"));
    assert_eq!(db.interfaces[0].protocol, "postgres");
    assert_eq!(db.interfaces[0].port, 5432);
    assert_eq!(db.env, [("MODE".to_string(), "x".to_string())]);
    assert_eq!(
        db.healthcheck,
        Some(Healthcheck::Tcp {
            addr: "localhost:5432".into(),
            timeout: Duration::from_secs(3)
        })
    );
    let api = &s.services[1];
    assert_eq!(api.depends_on, ["db"]);
    assert!(matches!(
        &api.healthcheck,
        Some(Healthcheck::Http { url, expect_status: None, .. }) if url == "http://localhost:8080/health"
    ));
    assert!(
        api.declared_at.ends_with("spec.star:4"),
        "{}",
        api.declared_at
    );
}

#[test]
fn syscall_faults_open_a_window_around_run_and_close_it_even_when_run_fails() {
    let (s, _) = spec(&format!(
        "{DB}
def test_ok():
    fault(db, write = deny(\"EIO\", probability = \"30%\"), fsync = delay(\"200ms\", label = \"slow\"), run = lambda: 1)

def test_raises():
    def boom():
        fail(\"inside\")
    fault(db, write = deny(\"ENOSPC\", trigger = \"nth=2\"), run = boom)
"
    ));
    let host = Arc::new(Recorder::default());
    assert_eq!(run(&s, "test_ok", &host), BodyOutcome::Returned(None));
    let calls = host.calls();
    let Call::Open {
        service, faults, ..
    } = &calls[0]
    else {
        panic!("{calls:?}");
    };
    assert_eq!(service, "db");
    let write = &faults.iter().find(|(k, _)| k == "write").expect("write").1;
    assert_eq!(write.action, Action::Deny { errno: 5 });
    assert!((write.probability - 0.3).abs() < 1e-9);
    let fsync = &faults.iter().find(|(k, _)| k == "fsync").expect("fsync").1;
    assert_eq!(fsync.action, Action::Delay { ns: 200_000_000 });
    assert_eq!(fsync.label.as_deref(), Some("slow"));
    assert_eq!(calls[1], Call::Close(7));

    let outcome = run(&s, "test_raises", &host);
    assert!(
        matches!(&outcome, BodyOutcome::Failed { message, .. } if message.contains("inside")),
        "{outcome:?}"
    );
    let calls = host.calls();
    let Call::Open { faults, .. } = &calls[0] else {
        panic!("{calls:?}");
    };
    assert_eq!(faults[0].1.trigger, Trigger::Nth(2));
    assert_eq!(calls.last(), Some(&Call::Close(7)), "{calls:?}");
}

#[test]
fn a_host_error_becomes_the_tests_error_with_the_hosts_words() {
    let (s, _) = spec(
        "gone = service(\"gone\", \"/bin/true\", interface(\"main\", \"tcp\", 1))
def test_gone():
    fault(gone, write = deny(\"EIO\"), run = lambda: 1)
",
    );
    let host = Arc::new(Recorder::default());
    let outcome = run(&s, "test_gone", &host);
    assert!(
        matches!(&outcome, BodyOutcome::Failed { message, .. } if message.contains("service \"gone\" has exited")),
        "{outcome:?}"
    );
}

#[test]
fn protocol_faults_hand_the_proxy_its_rules_with_matchers_and_odds() {
    let (s, _) = spec(&format!(
        "{DB}
def test_http():
    fault(api.public, error(method = \"POST\", path = \"/orders*\", status = 503, probability = 0.5), delay(path = \"/slow\", delay = \"1s\"), run = lambda: None)

def test_sql():
    fault(db.main, error(query = \"INSERT*\", code = \"53100\", message = \"disk full\"), run = lambda: None)
"
    ));
    let host = Arc::new(Recorder::default());
    assert_eq!(run(&s, "test_http", &host), BodyOutcome::Returned(None));
    let calls = host.calls();
    let Call::OpenProxy { target, rules } = &calls[0] else {
        panic!("{calls:?}");
    };
    assert_eq!(target, "api.public");
    assert_eq!(rules[0].method.as_deref(), Some("POST"));
    assert_eq!(rules[0].path.as_deref(), Some("/orders*"));
    assert!((rules[0].probability - 0.5).abs() < 1e-9);
    assert!(matches!(
        rules[0].action,
        ProxyAction::Error {
            status: Some(503),
            ..
        }
    ));
    assert_eq!(rules[1].action, ProxyAction::Delay { ns: 1_000_000_000 });
    assert_eq!(calls[1], Call::CloseProxy(8));

    assert_eq!(run(&s, "test_sql", &host), BodyOutcome::Returned(None));
    let calls = host.calls();
    let Call::OpenProxy { rules, .. } = &calls[0] else {
        panic!("{calls:?}");
    };
    assert_eq!(rules[0].query.as_deref(), Some("INSERT*"));
    assert!(matches!(
        &rules[0].action,
        ProxyAction::Error { code: Some(c), message, .. } if c == "53100" && message == "disk full"
    ));
}

#[test]
fn assertions_count_and_the_first_failure_is_recorded_with_both_values() {
    let (s, _) = spec(
        "def test_pass():
    assert_eq(1 + 1, 2)
    assert_true(True, \"fine\")

def test_fail():
    assert_eq(\"got\", \"want\", \"the values\")
",
    );
    let host = Arc::new(Recorder::default());
    assert_eq!(run(&s, "test_pass", &host), BodyOutcome::Returned(None));
    assert_eq!(host.assertions(), (2, None));
    let outcome = run(&s, "test_fail", &host);
    assert!(matches!(outcome, BodyOutcome::Failed { .. }), "{outcome:?}");
    let (count, detail) = host.assertions();
    assert_eq!(count, 3);
    let detail = detail.expect("recorded");
    assert_eq!(detail.func, "assert_eq");
    assert_eq!(detail.expected.as_deref(), Some("\"want\""));
    assert_eq!(detail.actual.as_deref(), Some("\"got\""));
    assert_eq!(detail.message.as_deref(), Some("the values"));
    assert_eq!(detail.line, Some(6));
}

#[test]
fn event_queries_see_the_hosts_trace() {
    let (s, _) = spec(
        "def test_events():
    denied = [e for e in events() if e.type == \"syscall\" and e.decision.startswith(\"deny\")]
    assert_eq(len(denied), 1)
    assert_eq(denied[0].service, \"db\")
    assert_eq(denied[0].path, \"/data/wal\")
",
    );
    let event = |seq, decision: &str| Event {
        seq,
        time_ns: seq,
        kind: "syscall".into(),
        service: "db".into(),
        fields: BTreeMap::from([
            ("decision".to_string(), decision.to_string()),
            ("path".to_string(), "/data/wal".to_string()),
        ]),
        vector_clock: BTreeMap::new(),
    };
    let host = Arc::new(Recorder {
        events: vec![event(1, "allow"), event(2, "deny(EIO)")],
        ..Recorder::default()
    });
    assert_eq!(run(&s, "test_events", &host), BodyOutcome::Returned(None));
}

#[test]
fn await_event_returns_the_first_match_in_any_form_and_fails_on_time() {
    let (s, _) = spec(
        "def test_dict():
    e = await_event({\"type\": \"syscall\", \"decision\": \"deny*\"})
    assert_eq(e.path, \"/data/wal\")
    assert_eq(e.seq, 2)

def test_fn():
    e = await_event(lambda e: e.decision == \"allow\", timeout = \"1s\")
    assert_eq(e.seq, 1)

def test_kwargs():
    assert_eq(await_event(type = \"syscall\", decision = \"deny*\").seq, 2)

def test_never():
    await_event(type = \"service_exited\", timeout = \"50ms\")

def test_nothing():
    await_event()
",
    );
    let event = |seq, decision: &str| Event {
        seq,
        time_ns: seq,
        kind: "syscall".into(),
        service: "db".into(),
        fields: BTreeMap::from([
            ("decision".to_string(), decision.to_string()),
            ("path".to_string(), "/data/wal".to_string()),
        ]),
        vector_clock: BTreeMap::new(),
    };
    let host = Arc::new(Recorder {
        events: vec![event(1, "allow"), event(2, "deny(EIO)")],
        ..Recorder::default()
    });
    for t in ["test_dict", "test_fn", "test_kwargs"] {
        assert_eq!(run(&s, t, &host), BodyOutcome::Returned(None), "{t}");
    }
    let started = std::time::Instant::now();
    let outcome = run(&s, "test_never", &host);
    assert!(
        matches!(&outcome, BodyOutcome::Failed { message, .. } if message.contains("no matching event within 50ms")),
        "{outcome:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    let outcome = run(&s, "test_nothing", &host);
    assert!(
        matches!(&outcome, BodyOutcome::Failed { message, .. } if message.contains("give what to wait for")),
        "{outcome:?}"
    );
}

#[test]
fn eventually_and_always_check_predicates_over_the_trace() {
    let (s, _) = spec(
        "def test_eventually():
    e = eventually(lambda e: e.decision.startswith(\"deny\"), timeout = \"1s\")
    assert_eq(e.seq, 2)

def test_never_comes():
    eventually(lambda e: e.decision == \"delay\", timeout = \"50ms\")

def test_always_holds():
    r = always(lambda e: e.service == \"db\", during = lambda: 42)
    assert_eq(r, 42)

def test_always_broken():
    always(lambda e: e.decision == \"allow\", during = lambda: None)
",
    );
    let event = |seq, decision: &str| Event {
        seq,
        time_ns: seq,
        kind: "syscall".into(),
        service: "db".into(),
        fields: BTreeMap::from([("decision".to_string(), decision.to_string())]),
        vector_clock: BTreeMap::new(),
    };
    let host = Arc::new(Recorder {
        events: vec![event(1, "allow"), event(2, "deny(EIO)")],
        ..Recorder::default()
    });
    assert_eq!(
        run(&s, "test_eventually", &host),
        BodyOutcome::Returned(None)
    );
    let outcome = run(&s, "test_never_comes", &host);
    assert!(
        matches!(&outcome, BodyOutcome::Failed { message, .. } if message.contains("eventually: no event satisfied") && message.contains("within 50ms")),
        "{outcome:?}"
    );
    // The recording host's events all predate the call: `always` looks
    // only at what happens during `during`, so with this host it holds
    // vacuously, and with a host whose trace grows it is checked.
    assert_eq!(
        run(&s, "test_always_holds", &host),
        BodyOutcome::Returned(None)
    );
    let busy = Arc::new(Recorder {
        ticking: true,
        ..Recorder::default()
    });
    let outcome = run(&s, "test_always_broken", &busy);
    assert!(
        matches!(&outcome, BodyOutcome::Failed { message, .. } if message.contains("always: event #1 (") && message.contains("does not satisfy")),
        "{outcome:?}"
    );
}

#[test]
fn sleep_waits_within_the_tests_time_and_await_stable_waits_for_quiet() {
    let (s, _) = spec(
        "def test_nap():
    sleep(\"100ms\")

def test_oversleep():
    sleep(\"1h\")

def test_settled():
    await_stable(quiescence_window = \"100ms\", timeout = \"2s\")

def test_restless():
    await_stable(quiescence_window = \"300ms\", timeout = \"600ms\")

def test_window_too_long():
    await_stable(quiescence_window = \"2s\", timeout = \"1s\")

def test_restless_but_ignored():
    await_stable(quiescence_window = \"100ms\", timeout = \"2s\", ignore = {\"type\": \"tick\"})
",
    );
    let quiet = Arc::new(Recorder::default());
    let t = std::time::Instant::now();
    assert_eq!(run(&s, "test_nap", &quiet), BodyOutcome::Returned(None));
    assert!(t.elapsed() >= Duration::from_millis(100));
    let outcome = run(&s, "test_oversleep", &quiet);
    assert!(
        matches!(&outcome, BodyOutcome::Failed { message, .. } if message.contains("sleep(3600s): the test has") && message.contains("--timeout")),
        "{outcome:?}"
    );
    assert_eq!(run(&s, "test_settled", &quiet), BodyOutcome::Returned(None));
    // A host whose trace gains an event at every poll never settles.
    let busy = Arc::new(Recorder {
        ticking: true,
        ..Recorder::default()
    });
    let outcome = run(&s, "test_restless", &busy);
    assert!(
        matches!(&outcome, BodyOutcome::Failed { message, .. } if message.contains("events kept coming for 600ms")),
        "{outcome:?}"
    );
    let outcome = run(&s, "test_window_too_long", &quiet);
    assert!(
        matches!(&outcome, BodyOutcome::Failed { message, .. } if message.contains("a quiet window of 2s cannot fit in the 1s")),
        "{outcome:?}"
    );
    assert_eq!(
        run(&s, "test_restless_but_ignored", &busy),
        BodyOutcome::Returned(None)
    );
}

#[test]
fn assert_eventually_polls_only_the_events_it_has_not_seen() {
    let (s, _) = spec(
        "def test_wait():
    assert_eventually(type = \"never\", timeout = \"200ms\")
",
    );
    let event = |seq| Event {
        seq,
        time_ns: seq,
        kind: "syscall".into(),
        service: "db".into(),
        fields: BTreeMap::new(),
        vector_clock: BTreeMap::new(),
    };
    let host = Arc::new(Recorder {
        events: vec![event(1), event(2), event(3)],
        ..Recorder::default()
    });
    let outcome = run(&s, "test_wait", &host);
    assert!(
        matches!(&outcome, BodyOutcome::Failed { message, .. } if message.contains("no matching event")),
        "{outcome:?}"
    );
    // About ten polls in 200 ms; the three events were handed out once.
    assert_eq!(*host.handed.lock().unwrap_or_else(|p| p.into_inner()), 3);
}

#[test]
fn steps_send_checked_arguments_and_return_the_reply_as_a_value() {
    let (s, _) = spec(&format!(
        "{DB}
def test_post():
    r = api.public.post(path = \"/orders\", body = \"{{}}\", headers = {{\"X-Id\": \"1\"}})
    assert_eq(r.status, 201)
    assert_true(r.ok)
    assert_eq(r.body, \"made\")
    return r.status

def test_typo():
    api.public.postt(path = \"/orders\")
"
    ));
    let host = Arc::new(Recorder {
        reply: Some(StepReply {
            status: 201,
            body: "made".into(),
            ok: true,
            ..StepReply::default()
        }),
        ..Recorder::default()
    });
    assert_eq!(
        run(&s, "test_post", &host),
        BodyOutcome::Returned(Some("201".into()))
    );
    let calls = host.calls();
    let Call::Step(call) = &calls[0] else {
        panic!("{calls:?}");
    };
    assert_eq!(
        (
            call.service.as_str(),
            call.interface.as_str(),
            call.protocol.as_str()
        ),
        ("api", "public", "http")
    );
    assert_eq!(call.method, "post");
    assert_eq!(call.port, 8080);
    assert_eq!(call.str("path"), Some("/orders"));
    assert_eq!(call.str("body"), Some("{}"));
    assert_eq!(
        call.args.get("headers"),
        Some(&Arg::Headers(vec![("X-Id".into(), "1".into())]))
    );
    let outcome = run(&s, "test_typo", &host);
    assert!(
        matches!(&outcome, BodyOutcome::Failed { message, .. } if message.contains("did you mean `post`")),
        "{outcome:?}"
    );
    assert!(host.calls().is_empty(), "a refused step sends nothing");
}

#[test]
fn files_are_read_relative_to_the_spec() {
    let (_, dir) = spec("x = 1\n");
    std::fs::write(dir.join("seed.sql"), "CREATE TABLE t (id int);\n").expect("write");
    std::fs::write(
        dir.join("spec2.star"),
        "SQL = load_file(\"seed.sql\")\ndef test_file():\n    assert_eq(SQL, \"CREATE TABLE t (id int);\\n\")\n",
    )
    .expect("write");
    let s = load(&dir.join("spec2.star")).unwrap_or_else(|e| panic!("{e}"));
    let host = Arc::new(Recorder::default());
    assert_eq!(run(&s, "test_file", &host), BodyOutcome::Returned(None));
    std::fs::write(dir.join("spec3.star"), "X = load_file(\"missing.txt\")\n").expect("write");
    let Err(e) = load(&dir.join("spec3.star")) else {
        panic!("a missing file loaded");
    };
    let e = e.to_string();
    assert!(
        e.contains("load_file(\"missing.txt\")") && e.contains("No such file"),
        "{e}"
    );
}

#[test]
fn proxy_addresses_are_placeholders_at_load_time_and_real_while_a_test_runs() {
    let (s, _) = spec(&format!(
        "{DB}
AT_LOAD = api.public.proxy_addr

def test_addr():
    assert_true(AT_LOAD.startswith(\"__FB_PROXY_ADDR_api__public\"), AT_LOAD)
    assert_eq(api.public.proxy_addr, \"127.0.0.1:40000\")
    assert_eq(api.public.proxy_host, \"127.0.0.1\")
    assert_eq(api.public.proxy_port, \"40000\")
    print(api.public.proxy_addr)
"
    ));
    let host = Arc::new(Recorder::default());
    assert_eq!(run(&s, "test_addr", &host), BodyOutcome::Returned(None));
}

fn syscall_event(seq: u64, decision: &str) -> Event {
    Event {
        seq,
        time_ns: seq,
        kind: "syscall".into(),
        service: "db".into(),
        fields: BTreeMap::from([("decision".to_string(), decision.to_string())]),
        vector_clock: BTreeMap::new(),
    }
}

fn failed_with(outcome: &BodyOutcome, words: &[&str]) -> bool {
    matches!(outcome, BodyOutcome::Failed { message, .. } if words.iter().all(|w| message.contains(w)))
}

#[test]
fn spec_wide_monitors_fold_state_over_each_tests_events_afresh() {
    let (s, _) = spec(
        "def bump(e, s):
    s[\"denied\"] += 1
    return s

monitor(\"two_denies_at_most\", on = {\"decision\": \"deny*\"}, state_init = {\"denied\": 0},
        update = bump, check = lambda e, s: s[\"denied\"] <= 2)

def test_a():
    pass

def test_b():
    pass
",
    );
    let host = Arc::new(Recorder {
        events: vec![
            syscall_event(1, "deny(EIO)"),
            syscall_event(2, "allow"),
            syscall_event(3, "deny(EIO)"),
            syscall_event(4, "deny(EIO)"),
        ],
        ..Recorder::default()
    });
    // The third deny (event 4) breaks it, in each test: the state starts
    // over, it is not carried from the test before.
    for test in ["test_a", "test_b"] {
        let outcome = run(&s, test, &host);
        assert!(
            failed_with(
                &outcome,
                &["monitor \"two_denies_at_most\" violated at event #4 (service=db type=syscall)"]
            ),
            "{test}: {outcome:?}"
        );
    }
    let calm = Arc::new(Recorder {
        events: vec![syscall_event(1, "deny(EIO)"), syscall_event(2, "allow")],
        ..Recorder::default()
    });
    assert_eq!(run(&s, "test_a", &calm), BodyOutcome::Returned(None));
}

#[test]
fn callback_monitors_fail_on_an_assertion_and_name_a_broken_callback() {
    let (s, _) = spec(
        "def no_eio(e):
    assert_true(e.decision != \"deny(EIO)\", \"EIO reached the service\")

monitor(no_eio, service = \"db\")

def test_x():
    pass
",
    );
    let host = Arc::new(Recorder {
        events: vec![syscall_event(1, "allow"), syscall_event(2, "deny(EIO)")],
        ..Recorder::default()
    });
    let outcome = run(&s, "test_x", &host);
    assert!(
        failed_with(
            &outcome,
            &[
                "violated at event #2 (service=db type=syscall)",
                "EIO reached the service"
            ]
        ),
        "{outcome:?}"
    );
    // A filter that matches nothing: the callback never runs.
    let (quiet, _) = spec(
        "monitor(lambda e: fail(\"never\"), service = \"api\")

def test_x():
    pass
",
    );
    assert_eq!(run(&quiet, "test_x", &host), BodyOutcome::Returned(None));
    let (broken, _) = spec(
        "def typo(e):
    return e.decision + 1

monitor(typo)

def test_x():
    pass
",
    );
    let outcome = run(&broken, "test_x", &host);
    assert!(
        failed_with(&outcome, &["its callback function failed at event #1"]),
        "{outcome:?}"
    );
    assert!(
        !failed_with(&outcome, &["violated"]),
        "a mistake in the callback is not a violation: {outcome:?}"
    );
}

#[test]
fn a_monitor_in_a_body_watches_the_rest_of_the_test_and_only_looks() {
    let (s, _) = spec(
        "def test_watch():
    monitor(\"no_ticks\", on = {\"type\": \"tick\"}, check = lambda e, s: False)
    sleep(\"200ms\")
    fail(\"the monitor should have stopped the test while it slept\")

def test_acting():
    monitor(\"naps\", check = lambda e, s: sleep(\"1ms\"))
    sleep(\"100ms\")
",
    );
    let busy = Arc::new(Recorder {
        ticking: true,
        ..Recorder::default()
    });
    let outcome = run(&s, "test_watch", &busy);
    assert!(
        failed_with(
            &outcome,
            &["monitor \"no_ticks\" violated at event #1 (service=db type=tick)"]
        ),
        "{outcome:?}"
    );
    let outcome = run(&s, "test_acting", &busy);
    assert!(
        failed_with(
            &outcome,
            &[
                "monitor \"naps\": its check function failed",
                "sleep() cannot be called from a monitor's callback"
            ]
        ),
        "{outcome:?}"
    );
}

#[test]
fn monitor_refuses_what_it_cannot_run() {
    for (call, words) in [
        (
            "monitor(42)",
            "the first argument is a callback or a name, got int",
        ),
        ("monitor(\"m\")", "give check=fn(event, state)"),
        (
            "monitor(\"m\", on = 5, check = lambda e, s: True)",
            "on= must be a dict of filters or a function",
        ),
        ("monitor(\"m\", check = 3)", "check"),
        ("monitor(\"m\", chek = lambda e, s: True)", "chek"),
    ] {
        let dir = std::env::temp_dir().join(format!("fb-monitor-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("spec.star");
        std::fs::write(&path, format!("{call}\n")).expect("write");
        let e = match load(&path) {
            Ok(_) => panic!("{call} loaded"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(words), "{call}: {e}");
    }
}

#[test]
fn partition_splits_two_services_for_its_function_and_refuses_one_service() {
    let (s, _) = spec(&format!(
        "{DB}
def test_split():
    assert_eq(partition(db, api, run = lambda: 5), 5)

def test_self():
    partition(db, db, run = lambda: None)

def test_stop_without_start():
    partition_stop(db, api)
"
    ));
    let host = Arc::new(Recorder::default());
    assert_eq!(run(&s, "test_split", &host), BodyOutcome::Returned(None));
    assert_eq!(
        host.calls(),
        vec![Call::Partition("db|api".into()), Call::Close(9)]
    );
    let outcome = run(&s, "test_self", &host);
    assert!(
        failed_with(&outcome, &["a service cannot be split from itself"]),
        "{outcome:?}"
    );
    let outcome = run(&s, "test_stop_without_start", &host);
    assert!(
        failed_with(
            &outcome,
            &["no partition_start split between them is in force"]
        ),
        "{outcome:?}"
    );
    assert!(
        s.intercept.iter().any(|c| c == "connect"),
        "{:?}",
        s.intercept
    );
}

#[test]
fn hold_is_a_rule_and_release_asks_the_host_with_its_decision() {
    let (s, _) = spec(&format!(
        "{DB}
def test_hold():
    n = fault(db, write = hold(tag = \"w\"), run = lambda: release(\"w\", decision = deny(\"EIO\"), count = 2))
    assert_eq(n, 1)

def test_untagged():
    hold()

def test_bad_decision():
    release(\"w\", decision = delay(\"1s\"))

def test_unknown():
    release(\"zz\")
"
    ));
    let host = Arc::new(Recorder::default());
    assert_eq!(run(&s, "test_hold", &host), BodyOutcome::Returned(None));
    let calls = host.calls();
    assert!(
        matches!(&calls[0], Call::Open { service, faults, .. } if service == "db"
            && faults[0].0 == "write"
            && faults[0].1.action == Action::Hold
            && faults[0].1.label.as_deref() == Some("w")),
        "{calls:?}"
    );
    assert_eq!(calls[1], Call::Release("w Some(5) Some(2)".into()));
    assert_eq!(calls[2], Call::Close(7));
    for (test, words) in [
        ("test_untagged", "hold(): give tag="),
        (
            "test_bad_decision",
            "decision= is allow() or deny(\"ERRNO\")",
        ),
        (
            "test_unknown",
            "no hold(tag=\"zz\") rule is in force; in force: w",
        ),
    ] {
        let outcome = run(&s, test, &host);
        assert!(failed_with(&outcome, &[words]), "{test}: {outcome:?}");
    }
}
