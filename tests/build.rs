//! Generates the tonic service code of `fbgrpc`'s test service from a
//! description in Rust (no protoc needed; the messages are hand-written
//! prost structs in src/bin/fbgrpc.rs).

fn main() {
    let method = |name: &str, route: &str| {
        tonic_build::manual::Method::builder()
            .name(name)
            .route_name(route)
            .input_type("crate::EchoRequest")
            .output_type("crate::EchoReply")
            .codec_path("tonic_prost::ProstCodec")
            .build()
    };
    let echo = tonic_build::manual::Service::builder()
        .name("Echo")
        .package("faultbox.test")
        .method(method("say", "Say"))
        .build();
    tonic_build::manual::Builder::new().compile(&[echo]);
}
