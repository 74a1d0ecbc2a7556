//! Sources turn a live system into a byte stream. One module per datastore.

pub mod aof;
pub mod etcd;
pub mod pgdata;
pub mod postgres;
pub mod postgres_tls;
pub mod redis;
