//! `grpc`: HTTP/2 streams decided one by one on their method path
//! (`/pkg.Service/Method`); errors are gRPC statuses in trailers. The
//! proxy and the step client are the hyper-based code in `h2.rs`.

use crate::Fields;
use crate::protocol::{Protocol, ProtocolError, Traits, Wire};
use crate::rules::{ProxyAction, ProxyRuleDef};
use crate::steps::{Kind, Param, StepCall, StepDef};

/// The `grpc` protocol.
pub struct Grpc;

const CALL: &[Param] = &[
    Param::req("method", Kind::Str),
    Param::opt("body", Kind::Str),
    Param::opt("timeout", Kind::Duration),
];
const STEPS: &[StepDef] = &[StepDef::new("call", CALL)];

const TRAITS: Traits = Traits {
    name: "grpc",
    step_label: "grpc step",
    steps: STEPS,
    matchers: &["method"],
    matcher_help: "method= (the full method path, e.g. \"/shop.Orders/Create\", * allowed)",
    error_fields: &["status"],
    duplicates: true,
    resets_on_drop: true,
    wire: Wire::H2,
    ..Traits::DEFAULT
};

impl Protocol for Grpc {
    fn traits(&self) -> &'static Traits {
        &TRAITS
    }

    fn check(&self, rule: &ProxyRuleDef) -> Result<(), ProtocolError> {
        match rule.action {
            ProxyAction::Respond { status: Some(_), .. } => Err(self.refuse("response() on grpc interfaces answers OK with body= (the raw message bytes); a failure is error(status=\"UNAVAILABLE\", ...)")),
            ProxyAction::Error {
                status: Some(s), ..
            } if !(1..=16).contains(&s) => Err(self.refuse(format!(
                "status={s} is not a gRPC error code: use 1..16 or a name such as \"UNAVAILABLE\""
            ))),
            _ => Ok(()),
        }
    }

    fn check_step(&self, call: &StepCall) -> Result<(), ProtocolError> {
        let method = call.str("method").unwrap_or_default();
        if !method.starts_with('/') || method.matches('/').count() != 2 {
            return Err(self.refuse_step(call, format!(
                "grpc step: method={method:?} is not a full gRPC method path such as \"/shop.Orders/Create\""
            )));
        }
        Ok(())
    }

    fn describe_step(&self, call: &StepCall) -> Fields {
        crate::steps::sent(call, "path", call.str("method").unwrap_or_default())
    }

    #[cfg(feature = "serve")]
    fn io(&self) -> &'static crate::protocol::Io {
        &io::IO
    }
}

#[cfg(feature = "serve")]
mod io {
    use crate::rules::grpc_code_name;
    use crate::steps::{StepCall, StepReply, StepResult};

    pub(super) const IO: crate::protocol::Io = crate::protocol::Io {
        serve: crate::h2::serve,
        step,
        ready: crate::net::connect_ready,
    };

    fn step(call: &StepCall, to: &crate::protocol::Target) -> StepResult {
        let method = call.str("method").unwrap_or_default();
        let body = call.str("body").unwrap_or_default();
        let timeout = call.timeout(std::time::Duration::from_secs(30));
        match crate::h2::grpc_call(to.addr, method, body.as_bytes(), timeout, to.tls) {
            Ok(r) => StepResult::Reply(StepReply {
                status: i64::from(r.code),
                ok: r.code == 0,
                error: if r.code == 0 {
                    String::new()
                } else {
                    format!("{}: {}", grpc_code_name(r.code), r.message)
                },
                body: String::from_utf8_lossy(&r.body).into_owned(),
                headers: r.headers,
                data: Some(serde_json::json!({
                    "code": r.code,
                    "code_name": grpc_code_name(r.code),
                    "message": r.message,
                    "messages": r.messages,
                })),
                ..Default::default()
            }),
            Err(e) => crate::net::failed(e),
        }
    }
}
