//! One module per protocol; each implements [`crate::protocol::Protocol`]
//! and is listed once in [`crate::protocol::REGISTRY`].

pub mod grpc;
pub mod http;
pub mod memcached;
pub mod mysql;
pub mod postgres;
pub mod redis;
pub mod tcp;
pub mod udp;
