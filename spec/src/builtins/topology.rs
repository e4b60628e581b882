//! Topology and healthchecks: `service`, `interface`, `tcp`, `http`,
//! `ready`, `op`, `remotes`, `tls_cert`, `free_port`.

use super::files::resolve_relative;
#[allow(unused_imports)]
use super::*;

/// `remote="host[:port]"` or `remote=remotes({iface: "host[:port]"})`:
/// each interface's upstream; a bare host takes the interface's port.
fn remote_upstreams(
    name: &str,
    v: Value,
    interfaces: &[InterfaceDef],
) -> Res<BTreeMap<String, String>> {
    if interfaces.is_empty() {
        return Err(err(format!(
            "service({name:?}): a remote service needs at least one interface(...) to proxy"
        )));
    }
    let with_port = |addr: &str, port: u16| {
        if addr
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            addr.to_string()
        } else {
            format!("{addr}:{port}")
        }
    };
    let mut out = BTreeMap::new();
    if let Some(addr) = v.unpack_str() {
        if addr.is_empty() {
            return Err(err(format!("service({name:?}): remote=\"\" is empty")));
        }
        let has_port = with_port(addr, 0) == addr;
        if has_port && interfaces.len() > 1 {
            return Err(err(format!(
                "service({name:?}): remote={addr:?} names one port for {} interfaces; give a bare host (each interface keeps its port) or remotes({{iface: \"host:port\"}})",
                interfaces.len()
            )));
        }
        for i in interfaces {
            out.insert(i.name.clone(), with_port(addr, i.port));
        }
        return Ok(out);
    }
    let d = DictRef::from_value(v).ok_or_else(|| {
        err(format!(
            "service({name:?}): remote= must be \"host[:port]\" or remotes({{iface: \"host[:port]\"}}), got {}",
            v.get_type()
        ))
    })?;
    for (k, val) in d.iter() {
        let (Some(k), Some(addr)) = (k.unpack_str(), val.unpack_str()) else {
            return Err(err(format!(
                "service({name:?}): remotes() maps interface names to \"host[:port]\" strings"
            )));
        };
        let iface = interfaces.iter().find(|i| i.name == k).ok_or_else(|| {
            err(format!(
                "service({name:?}): remotes() names {k:?}, which is not one of its interfaces"
            ))
        })?;
        out.insert(k.to_string(), with_port(addr, iface.port));
    }
    if let Some(missing) = interfaces.iter().find(|i| !out.contains_key(&i.name)) {
        return Err(err(format!(
            "service({name:?}): remotes() gives no address for interface {:?}",
            missing.name
        )));
    }
    Ok(out)
}

/// Protocols the original project names that this build has no proxy,
/// steps or probe for: refused at load, with a way out.
const NOT_IN_THIS_BUILD: &[&str] = &[
    "kafka",
    "nats",
    "mongodb",
    "cassandra",
    "clickhouse",
    "amqp",
];

/// The ports `def` takes on this machine, with what takes each: a binary's
/// interfaces, a container's fixed `ports=` mappings.
fn host_ports(def: &ServiceDef) -> Vec<(u16, String)> {
    match &def.container {
        _ if def.is_remote() => Vec::new(),
        Some(c) => c
            .ports
            .iter()
            .filter(|(_, host)| **host != 0)
            .map(|(inner, host)| (*host, format!("ports={{{inner}: {host}}}")))
            .collect(),
        None => def
            .interfaces
            .iter()
            .map(|i| (i.port, format!("interface {:?}", i.name)))
            .collect(),
    }
}

/// The container half of `service(...)`: `image=` or `build=` with the
/// keywords only a container has; `None` for a binary or remote service,
/// which may not use them.
fn container_def(
    a: &Args<'_>,
    name: &str,
    has_binary: bool,
    remote: bool,
) -> Res<Option<ContainerDef>> {
    let image = a.named("image").map(|v| a.string(v, "image")).transpose()?;
    let build = a.named("build").map(|v| a.string(v, "build")).transpose()?;
    let source = match (image, build) {
        (Some(_), Some(_)) => {
            return Err(err(format!(
                "service({name:?}): image= and build= both given; use one (build= makes the image from a Dockerfile)"
            )));
        }
        (Some(i), None) if i.trim().is_empty() => {
            return Err(err(format!("service({name:?}): image=\"\" is empty")));
        }
        (None, Some(b)) if b.trim().is_empty() => {
            return Err(err(format!(
                "service({name:?}): build=\"\" is empty; give the directory that holds the Dockerfile"
            )));
        }
        (Some(i), None) => Some(ImageSource::Pull(i)),
        (None, Some(b)) => Some(ImageSource::Build(b)),
        (None, None) => None,
    };
    let Some(image) = source else {
        for (k, why) in [
            ("entrypoint", "replaces a container image's ENTRYPOINT"),
            ("ports", "publishes a container's ports"),
            ("volumes", "mounts into a container"),
            ("reuse", "keeps a container across tests"),
            ("seccomp", "turns off the shim of a container"),
        ] {
            if a.named(k).is_some() {
                return Err(err(format!(
                    "service({name:?}): {k}= {why}; give image=\"...\" or build=\"./dir\", or drop {k}="
                )));
            }
        }
        return Ok(None);
    };
    let key = if matches!(image, ImageSource::Pull(_)) {
        "image"
    } else {
        "build"
    };
    if has_binary {
        return Err(err(format!(
            "service({name:?}): {key}= runs a container, so there is no binary to give; drop the binary or drop {key}="
        )));
    }
    if remote {
        return Err(err(format!(
            "service({name:?}): {key}= runs a container here and remote= names a service elsewhere; use one"
        )));
    }
    let entrypoint = a
        .named("entrypoint")
        .map(|v| match v.unpack_str() {
            Some(s) => Ok(vec![s.to_string()]),
            None => a.strings(v, "entrypoint"),
        })
        .transpose()?;
    if entrypoint.as_ref().is_some_and(|e| e.is_empty()) {
        return Err(err(format!(
            "service({name:?}): entrypoint=[] is empty; give the program and its arguments, or drop entrypoint= to keep the image's"
        )));
    }
    let cmd = a.named("args").map(|v| a.strings(v, "args")).transpose()?;
    let mut ports = BTreeMap::new();
    if let Some(v) = a.named("ports") {
        let d = DictRef::from_value(v).ok_or_else(|| {
            err(format!(
                "service({name:?}): ports must be a dict {{container_port: host_port}}"
            ))
        })?;
        for (k, val) in d.iter() {
            let port = |x: Value<'_>, what: &str, zero: bool| -> Res<u16> {
                x.unpack_i32()
                    .and_then(|p| u16::try_from(p).ok())
                    .filter(|p| zero || *p != 0)
                    .ok_or_else(|| {
                        err(format!(
                            "service({name:?}): ports: {what} {} must be a port number (1-65535{})",
                            x.to_repr(),
                            if zero { ", or 0 for any free port" } else { "" }
                        ))
                    })
            };
            ports.insert(
                port(k, "container port", false)?,
                port(val, "host port", true)?,
            );
        }
    }
    let mut volumes = Vec::new();
    if let Some(v) = a.named("volumes") {
        let d = DictRef::from_value(v).ok_or_else(|| {
            err(format!(
                "service({name:?}): volumes must be a dict {{host_path_or_volume: container_path}}"
            ))
        })?;
        for (k, val) in d.iter() {
            let from = a.string(k, "volumes key")?;
            let to = a.string(val, "volumes value")?;
            if !to.starts_with('/') {
                return Err(err(format!(
                    "service({name:?}): volumes: {to:?} must be an absolute path inside the container"
                )));
            }
            volumes.push((from, to));
        }
    }
    Ok(Some(ContainerDef {
        image,
        entrypoint,
        cmd,
        ports,
        volumes,
    }))
}

/// A list of `determinism()` categories, each checked.
fn nondeterminism_kinds<'v>(a: &Args<'v>, v: Value<'v>, what: &str) -> Res<Vec<String>> {
    let list = ListRef::from_value(v).ok_or_else(|| {
        err(format!(
            "{what} must be a list of kinds, got {} ({})",
            v.get_type(),
            v.to_repr()
        ))
    })?;
    let known: Vec<&str> = crate::model::NONDETERMINISM
        .iter()
        .map(|(k, _)| *k)
        .collect();
    let mut kinds = Vec::new();
    for item in list.iter() {
        let kind = a.string(item, what)?;
        if !known.contains(&kind.as_str()) {
            let hint = if kind == "fs-unmediated" {
                " (file I/O outside Faultbox's view is not detected by this build)"
            } else {
                ""
            };
            return Err(err(format!(
                "{what}: unknown kind {kind:?}{hint}; the kinds are {}",
                known.join(", ")
            )));
        }
        kinds.push(kind);
    }
    Ok(kinds)
}

#[starlark_module]
pub(crate) fn topology(builder: &mut GlobalsBuilder) {
    /// `determinism(level="L1", strict=True, allow=[...], runtime="default")`:
    /// report what the services read or reach that Faultbox does not
    /// decide (the clock, randomness, DNS, undeclared addresses) as
    /// `unmediated_io` events; strict, the first untolerated one fails
    /// the test.
    fn determinism<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<NoneType> {
        let a = Args::new("determinism", args, kwargs)?;
        a.check(0, &["level", "strict", "allow", "runtime"])?;
        let c = ctx(eval)?;
        if c.run.is_some() {
            return Err(err(
                "determinism() must be called at the top level of the spec, not inside a test",
            ));
        }
        if let Some(level) = a.named("level") {
            let level = a.string(level, "level")?;
            if level != "L1" {
                return Err(err(format!(
                    "determinism(level={level:?}): this build detects level L1 only (the clock, randomness, DNS and undeclared network reached through syscalls); drop level= or write level=\"L1\""
                )));
            }
        }
        if let Some(runtime) = a.named("runtime") {
            let runtime = a.string(runtime, "runtime")?;
            if runtime != "default" {
                return Err(err(format!(
                    "determinism(runtime={runtime:?}): this build has no {runtime} runtime; detection runs on the services' seccomp filters (runtime=\"default\"), so drop runtime="
                )));
            }
        }
        let allow = match a.named("allow") {
            Some(v) => nondeterminism_kinds(&a, v, "determinism(): allow")?,
            None => Vec::new(),
        };
        let mut slot = c.determinism.borrow_mut();
        if slot.is_some() {
            return Err(err(
                "determinism() is called twice; call it once, at the top of the spec",
            ));
        }
        *slot = Some(crate::model::Determinism {
            strict: a.named("strict").is_none_or(|v| v.to_bool()),
            allow,
            tolerated: BTreeMap::new(),
        });
        Ok(NoneType)
    }

    /// `service(name, [binary], *interfaces, args=, env=, depends_on=,
    /// healthcheck=, ops=, user=)`: declares a service started from a
    /// local binary.
    fn service<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<Value<'v>> {
        let a = Args::new("service", args, kwargs)?;
        for (bad, why) in [
            (
                "cmd",
                "there is no cmd=; put the program in binary= (or the image's CMD in args=[...])",
            ),
            (
                "command",
                "there is no command=; put the program in binary= (or the image's CMD in args=[...])",
            ),
        ] {
            if a.named.iter().any(|(k, _)| k == bad) {
                return Err(err(format!("service(): {why}")));
            }
        }
        a.check(
            usize::MAX,
            &[
                "name",
                "binary",
                "image",
                "build",
                "args",
                "entrypoint",
                "env",
                "depends_on",
                "healthcheck",
                "ops",
                "user",
                "remote",
                "ports",
                "volumes",
                "reuse",
                "seccomp",
                "nondeterministic_ok",
            ],
        )?;
        let c = ctx(eval)?;
        if c.run.is_some() {
            return Err(err(
                "service() must be called at the top level of the spec, not inside a test",
            ));
        }
        let name = a.string(a.required(0, "name")?, "name")?;
        if name.is_empty()
            || !name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-')
        {
            return Err(err(format!(
                "service(): name {name:?} must be non-empty letters, digits, '_' or '-'"
            )));
        }
        let mut binary = a
            .named("binary")
            .map(|v| a.string(v, "binary"))
            .transpose()?;
        let mut interfaces: Vec<InterfaceDef> = Vec::new();
        for (i, v) in a.pos.iter().enumerate().skip(1) {
            if let Some(s) = v.unpack_str() {
                if binary.is_some() {
                    return Err(err(format!(
                        "service({name:?}): the binary is given twice (positional {s:?} and another)"
                    )));
                }
                binary = Some(s.to_string());
            } else if let Some(iface) = InterfaceValue::from_value(*v) {
                if interfaces.iter().any(|x| x.name == iface.def.name) {
                    return Err(err(format!(
                        "service({name:?}): two interfaces are named {:?}",
                        iface.def.name
                    )));
                }
                interfaces.push(iface.def.clone());
            } else {
                return Err(err(format!(
                    "service({name:?}): positional argument {} must be the binary (a string) or an interface(...), got {}",
                    i + 1,
                    v.get_type()
                )));
            }
        }
        let remote = match a.named("remote") {
            Some(v) => remote_upstreams(&name, v, &interfaces)?,
            None => BTreeMap::new(),
        };
        if !remote.is_empty() {
            if binary.is_some() {
                return Err(err(format!(
                    "service({name:?}): a remote service runs nothing here; drop the binary, or drop remote="
                )));
            }
            for k in [
                "args",
                "env",
                "ops",
                "user",
                "entrypoint",
                "ports",
                "volumes",
                "reuse",
                "seccomp",
                "nondeterministic_ok",
            ] {
                if a.named(k).is_some() {
                    return Err(err(format!(
                        "service({name:?}): {k}= needs a process Faultbox starts, and a remote service has none; fault it at the protocol level instead (fault({name}.<interface>, error(...), ...))"
                    )));
                }
            }
            if a.named("healthcheck").is_none() && a.named("image").or(a.named("build")).is_none() {
                return Err(err(format!(
                    "service({name:?}): a remote service needs healthcheck= (e.g. tcp(\"host:port\")), so a test never starts against an unreachable upstream"
                )));
            }
        }
        let container = container_def(&a, &name, binary.is_some(), !remote.is_empty())?;
        let binary = match (binary, remote.is_empty() && container.is_none()) {
            (Some(b), _) if b.trim().is_empty() => {
                return Err(err(format!(
                    "service({name:?}): the binary is an empty string; give the program to run, e.g. service({name:?}, \"./bin/{name}\", ...)"
                )));
            }
            (Some(b), _) => b,
            (None, false) => String::new(),
            (None, true) => {
                return Err(err(format!(
                    "service({name:?}): no binary; give the program to run, e.g. service({name:?}, \"./bin/{name}\", ...), image=\"...\" or build=\"./dir\" for a container, or remote=\"host:port\" for a service that runs elsewhere"
                )));
            }
        };
        // A container's args= is its CMD (kept in `container`).
        let args_list = match a.named("args") {
            Some(v) if container.is_none() => a.strings(v, "args")?,
            _ => Vec::new(),
        };
        let mut env = Vec::new();
        if let Some(v) = a.named("env") {
            let d = DictRef::from_value(v)
                .ok_or_else(|| err(format!("service({name:?}): env must be a dict of strings")))?;
            for (k, val) in d.iter() {
                let k = a.string(k, "env key")?;
                let text = if let Some(s) = val.unpack_str() {
                    s.to_string()
                } else if val.unpack_i32().is_some() || val.unpack_bool().is_some() {
                    val.to_str()
                } else {
                    return Err(err(format!(
                        "service({name:?}): env[{k:?}] must be a string, got {} ({})",
                        val.get_type(),
                        val.to_repr()
                    )));
                };
                env.push((k, text));
            }
        }
        let mut depends_on = Vec::new();
        if let Some(v) = a.named("depends_on") {
            let items = ListRef::from_value(v)
                .map(|l| l.content().to_vec())
                .ok_or_else(|| {
                    err(format!(
                        "service({name:?}): depends_on must be a list of services"
                    ))
                })?;
            for item in items {
                let dep = match (ServiceValue::from_value(item), item.unpack_str()) {
                    (Some(s), _) => s.def.name.clone(),
                    (None, Some(s)) => s.to_string(),
                    _ => {
                        return Err(err(format!(
                            "service({name:?}): depends_on items must be services, got {}",
                            item.get_type()
                        )));
                    }
                };
                depends_on.push(dep);
            }
        }
        let healthcheck = match a.named("healthcheck") {
            Some(v) => Some(
                HealthcheckValue::from_value(v)
                    .ok_or_else(|| {
                        err(format!(
                            "service({name:?}): healthcheck must be tcp(...), http(...) or ready(), got {}",
                            v.get_type()
                        ))
                    })?
                    .check
                    .clone(),
            ),
            None => None,
        };
        let mut ops = BTreeMap::new();
        if let Some(v) = a.named("ops") {
            let d = DictRef::from_value(v)
                .ok_or_else(|| err(format!("service({name:?}): ops must be a dict of op(...)")))?;
            for (k, val) in d.iter() {
                let k = a.string(k, "ops key")?;
                let op = OpValue::from_value(val).ok_or_else(|| {
                    err(format!(
                        "service({name:?}): ops[{k:?}] must be op(...), got {}",
                        val.get_type()
                    ))
                })?;
                ops.insert(k, op.def.clone());
            }
        }
        let user = a.named("user").map(|v| a.string(v, "user")).transpose()?;
        if let Some(v) = a.named("nondeterministic_ok") {
            if a.named("seccomp").is_some_and(|v| !v.to_bool()) {
                return Err(err(format!(
                    "service({name:?}): nondeterministic_ok= tolerates what the service's filter sees, and seccomp=False gives it none; drop one of them"
                )));
            }
            let kinds =
                nondeterminism_kinds(&a, v, &format!("service({name:?}): nondeterministic_ok"))?;
            c.tolerated.borrow_mut().insert(name.clone(), kinds);
        }
        let (file, line) = call_site(eval);
        let def = ServiceDef {
            name: name.clone(),
            binary,
            args: args_list,
            env,
            interfaces,
            depends_on,
            healthcheck,
            ops,
            user,
            remote,
            container,
            seccomp: a.named("seccomp").is_none_or(|v| v.to_bool()),
            reuse: a.named("reuse").is_some_and(|v| v.to_bool()),
            declared_at: format!("{}:{}", file.unwrap_or_default(), line.unwrap_or(0)),
        };
        let mut services = c.services.borrow_mut();
        if let Some(other) = services.iter().find(|s| s.name == name) {
            return Err(err(format!(
                "service(): {name:?} is already declared at {}",
                other.declared_at
            )));
        }
        // Remote services' ports are on other machines and a container's
        // are its own: only ports taken on this machine can collide.
        for (port, what) in host_ports(&def) {
            for other in services.iter() {
                if let Some((_, o)) = host_ports(other).into_iter().find(|(p, _)| *p == port) {
                    return Err(err(format!(
                        "service({name:?}): port {port} of {what} is already used by {}.{o}",
                        other.name
                    )));
                }
            }
        }
        services.push(def.clone());
        Ok(eval.heap().alloc(ServiceValue { def }))
    }

    /// `interface(name, protocol, port)`.
    fn interface<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<Value<'v>> {
        let a = Args::new("interface", args, kwargs)?;
        a.check(3, &["name", "protocol", "port", "tls"])?;
        let name = a.string(a.required(0, "name")?, "name")?;
        let protocol = a.string(a.required(1, "protocol")?, "protocol")?;
        if faultbox_proxy::protocol::get(&protocol).is_none() {
            let supported = faultbox_proxy::protocol::names().join(", ");
            return Err(err(if NOT_IN_THIS_BUILD.contains(&protocol.as_str()) {
                format!(
                    "interface({name:?}): protocol {protocol:?} is not supported by this build (supported: {supported}); declare it \"tcp\" to proxy its bytes with connection-level faults"
                )
            } else {
                let hint = errno::closest(&protocol, faultbox_proxy::protocol::names().into_iter())
                    .map(|c| format!(" (did you mean {c}?)"))
                    .unwrap_or_default();
                format!(
                    "interface({name:?}): unknown protocol {protocol:?}{hint}; supported: {supported}"
                )
            }));
        }
        let port_v = a.required(2, "port")?;
        let port = port_v
            .unpack_i32()
            .filter(|p| (1..=65535).contains(p))
            .ok_or_else(|| {
                err(format!(
                    "interface({name:?}): port must be an integer 1..65535, got {}",
                    port_v.to_repr()
                ))
            })?;
        let tls = match a.named("tls") {
            None => None,
            Some(v) if v.unpack_bool() == Some(false) => None,
            Some(v) if v.unpack_bool() == Some(true) => Some(TlsSpec::default()),
            Some(v) => Some(
                TlsValue::from_value(v)
                    .ok_or_else(|| {
                        err(format!(
                            "interface({name:?}): tls= must be tls_cert(...) or True, got {}",
                            v.get_type()
                        ))
                    })?
                    .spec
                    .clone(),
            ),
        };
        if tls.is_some() && !faultbox_proxy::rules::proxied(&protocol) {
            return Err(err(format!(
                "interface({name:?}): tls= needs a proxy, and {protocol} interfaces have none in this build (http, grpc, tcp, redis, postgres and mysql do)"
            )));
        }
        Ok(eval.heap().alloc(InterfaceValue {
            def: InterfaceDef {
                name,
                protocol,
                port: port as u16,
                tls,
            },
        }))
    }

    /// `tcp(addr, timeout="10s")`: ready when a TCP connect succeeds.
    fn tcp<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<Value<'v>> {
        let a = Args::new("tcp", args, kwargs)?;
        a.check(1, &["addr", "timeout"])?;
        let addr = a.string(a.required(0, "addr")?, "addr")?;
        let addr = addr.strip_prefix("tcp://").unwrap_or(&addr).to_string();
        if !addr.contains(':') {
            return Err(err(format!(
                "tcp({addr:?}): the address needs a port, like \"localhost:5432\""
            )));
        }
        let timeout = a.duration_or("timeout", Duration::from_secs(10))?;
        Ok(eval.heap().alloc(HealthcheckValue {
            check: Healthcheck::Tcp { addr, timeout },
        }))
    }

    /// `http(url, timeout="10s", expect_status=None)`: ready when `GET url`
    /// answers `expect_status` (any 2xx/3xx when not given).
    fn http<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<Value<'v>> {
        let a = Args::new("http", args, kwargs)?;
        a.check(1, &["url", "timeout", "expect_status"])?;
        let url = a.string(a.required(0, "url")?, "url")?;
        let url = if url.contains("://") {
            url
        } else {
            format!("http://{url}")
        };
        steps::split_url(&url).map_err(|e| err(format!("http(): {e}")))?;
        let timeout = a.duration_or("timeout", Duration::from_secs(10))?;
        let expect_status = match a.named("expect_status") {
            Some(v) => Some(
                v.unpack_i32()
                    .filter(|s| (100..=599).contains(s))
                    .ok_or_else(|| {
                        err(format!(
                            "http(): expect_status must be an HTTP status 100..599, got {}",
                            v.to_repr()
                        ))
                    })? as u16,
            ),
            None => None,
        };
        Ok(eval.heap().alloc(HealthcheckValue {
            check: Healthcheck::Http {
                url,
                timeout,
                expect_status,
            },
        }))
    }

    /// `ready(timeout="30s")`: ready when the service answers its first
    /// interface's protocol (`SELECT 1` for postgres, `GET /` for http, a
    /// TCP connect otherwise).
    fn ready<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<Value<'v>> {
        let a = Args::new("ready", args, kwargs)?;
        a.check(0, &["timeout"])?;
        let timeout = a.duration_or("timeout", Duration::from_secs(30))?;
        Ok(eval.heap().alloc(HealthcheckValue {
            check: Healthcheck::Ready { timeout },
        }))
    }

    /// `op(syscalls=[...], path=None)`: a named operation for `ops=`.
    fn op<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<Value<'v>> {
        let a = Args::new("op", args, kwargs)?;
        a.check(0, &["syscalls", "path"])?;
        let syscalls = match a.named("syscalls") {
            Some(v) => a.strings(v, "syscalls")?,
            None => return Err(err("op(): missing syscalls=[...]")),
        };
        if syscalls.is_empty() {
            return Err(err("op(): syscalls=[] is empty; list at least one syscall"));
        }
        let arch = Arch::native();
        for s in &syscalls {
            for x in syscalls::expand_family(arch, s) {
                if arch.number(x).is_none() {
                    let hint = errno::closest(s, arch.all_names())
                        .map(|c| format!(" (did you mean {c}?)"))
                        .unwrap_or_default();
                    return Err(err(format!("op(): unknown syscall {s:?}{hint}")));
                }
            }
        }
        let path = a.named("path").map(|v| a.string(v, "path")).transpose()?;
        if let Some(p) = &path {
            faultbox_agent::glob::Glob::new(p)
                .map_err(|e| err(format!("op(): path {p:?}: {e}")))?;
        }
        Ok(eval.heap().alloc(OpValue {
            def: OpDef { syscalls, path },
        }))
    }

    /// `remotes({iface: "host[:port]"})`: per-interface upstreams for
    /// `service(remote=...)`.
    fn remotes<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
    ) -> starlark::Result<Value<'v>> {
        let a = Args::new("remotes", args, kwargs)?;
        a.check(1, &["mapping"])?;
        let m = a.required(0, "mapping")?;
        let d = DictRef::from_value(m)
            .ok_or_else(|| err("remotes(): takes a dict {interface: \"host[:port]\"}"))?;
        for (k, v) in d.iter() {
            if k.unpack_str().is_none() || v.unpack_str().is_none() {
                return Err(err(
                    "remotes(): keys are interface names and values \"host[:port]\" strings",
                ));
            }
        }
        Ok(m)
    }

    /// `tls_cert(proxy_cert=, proxy_key=, client_cert=, client_key=, ca=,
    /// insecure=False, secret=)`: TLS for `interface(..., tls=...)`. Paths
    /// are relative to the calling file; nothing given = a generated CA;
    /// `secret=` names a Kubernetes Secret with the proxy's certificate
    /// (in a FaultTest's runner).
    fn tls_cert<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<Value<'v>> {
        let a = Args::new("tls_cert", args, kwargs)?;
        a.check(
            0,
            &[
                "proxy_cert",
                "proxy_key",
                "client_cert",
                "client_key",
                "ca",
                "insecure",
                "secret",
            ],
        )?;
        let path = |k: &str| -> Res<Option<std::path::PathBuf>> {
            a.named(k)
                .map(|v| a.string(v, k).map(|p| resolve_relative(eval, &p)))
                .transpose()
        };
        let spec = TlsSpec {
            proxy_cert: path("proxy_cert")?,
            proxy_key: path("proxy_key")?,
            client_cert: path("client_cert")?,
            client_key: path("client_key")?,
            ca: path("ca")?,
            proxy_ca: None,
            secret: a
                .named("secret")
                .map(|v| a.string(v, "secret"))
                .transpose()?,
            insecure: a
                .named("insecure")
                .and_then(|v| v.unpack_bool())
                .unwrap_or(false),
        };
        spec.validate()
            .map_err(|e| err(format!("tls_cert(): {e}")))?;
        if let Ok(c) = ctx(eval) {
            c.files.borrow_mut().extend(
                [
                    &spec.proxy_cert,
                    &spec.proxy_key,
                    &spec.client_cert,
                    &spec.client_key,
                    &spec.ca,
                ]
                .into_iter()
                .flatten()
                .cloned(),
            );
        }
        Ok(eval.heap().alloc(TlsValue { spec }))
    }

    /// `free_port()`: a TCP port nothing listens on right now, for specs
    /// that must not collide with whatever else runs on the machine.
    fn free_port() -> anyhow::Result<i32> {
        let l = std::net::TcpListener::bind(("127.0.0.1", 0))?;
        Ok(i32::from(l.local_addr()?.port()))
    }
}
