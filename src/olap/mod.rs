//! The ClickHouse client: the source of truth for play counts.
//!
//! Validation of rows against the server schema is off because the client's validation
//! queries (`describe_include_subcolumns`, `RowBinaryWithNamesAndTypes`) do not exist on
//! ClickHouse 18.16, one of the two servers topk must run on.

pub mod tables;

use clickhouse::Client;

use crate::config::ClickHouseArgs;

/// A client for the configured database.
pub fn client(args: &ClickHouseArgs) -> Client {
    server_client(args).with_database(&args.database)
}

/// A client without a default database (for `CREATE DATABASE`).
pub fn server_client(args: &ClickHouseArgs) -> Client {
    Client::default()
        .with_url(&args.url)
        .with_user(&args.user)
        .with_password(args.password())
        .with_validation(false)
}

/// Whether the server answers a trivial query.
pub async fn ping(client: &Client) -> Result<(), clickhouse::error::Error> {
    client.query("SELECT 1").fetch_one::<u8>().await.map(|_| ())
}
