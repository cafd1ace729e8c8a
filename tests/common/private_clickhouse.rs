//! A private `clickhouse-server` for tests that need a server configured otherwise than the
//! stack's (another timezone).

use std::process::{Command, Stdio};

use topk::config::ClickHouseArgs;

use super::private_process::PrivateProcess;

/// A private `clickhouse-server` on free ports with the given `<timezone>`, killed on drop.
pub struct PrivateClickHouse {
    _process: PrivateProcess,
    http_port: u16,
}

impl PrivateClickHouse {
    /// The same configuration as `scripts/stack` writes, but for the timezone.
    pub async fn start(timezone: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().display();
        let (http_port, tcp_port) = (super::free_port(), super::free_port());
        let config = format!(
            "<yandex>
    <logger><level>warning</level><log>{d}/server.log</log><errorlog>{d}/error.log</errorlog></logger>
    <listen_host>127.0.0.1</listen_host>
    <http_port>{http_port}</http_port>
    <tcp_port>{tcp_port}</tcp_port>
    <path>{d}/data/</path>
    <tmp_path>{d}/tmp/</tmp_path>
    <user_files_path>{d}/user_files/</user_files_path>
    <format_schema_path>{d}/format_schemas/</format_schema_path>
    <users_config>{d}/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>{timezone}</timezone>
    <mark_cache_size>67108864</mark_cache_size>
</yandex>
"
        );
        let users = "<yandex>
    <profiles><default></default></profiles>
    <users><default><password></password><networks><ip>127.0.0.1</ip></networks>
        <profile>default</profile><quota>default</quota></default></users>
    <quotas><default><keyed/></default></quotas>
</yandex>
";
        std::fs::write(dir.path().join("config.xml"), config).expect("config.xml");
        std::fs::write(dir.path().join("users.xml"), users).expect("users.xml");
        let mut command = Command::new("/usr/sbin/clickhouse-server");
        command
            .arg(format!("--config-file={d}/config.xml"))
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut process = PrivateProcess::spawn("clickhouse-server", command, dir, "error.log");
        let client = topk::olap::server_client(&server_args(http_port, "default"));
        process
            .wait_until(600, async || topk::olap::ping(&client).await.is_ok())
            .await;
        PrivateClickHouse {
            _process: process,
            http_port,
        }
    }

    pub fn args(&self, database: &str) -> ClickHouseArgs {
        server_args(self.http_port, database)
    }
}

fn server_args(http_port: u16, database: &str) -> ClickHouseArgs {
    ClickHouseArgs {
        url: format!("http://127.0.0.1:{http_port}"),
        ..super::clickhouse_args(database)
    }
}
