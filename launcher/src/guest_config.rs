//! The guest's configuration (read by `nestbox-guest` as PID 1; schema in
//! `guest/src/config.rs`), written by the launcher and handed to the VM on
//! the read-only config disk: the TOML document followed by NUL padding to
//! a multiple of 512 bytes (a block device's size is whole sectors; PID 1
//! reads up to the first NUL).
//!
//! The launcher sets what only it knows (name, address, token hash, the
//! image's fixed paths); everything else comes verbatim from the `[guest]`
//! table of `launcher.toml`. The launcher does not link the guest crate:
//! the keys below are the contract (`notes/issue5-contract.md`).

use std::net::Ipv4Addr;

use toml::{Table, Value};

/// Where the guest mounts its data disk.
pub const DATA_DIR: &str = "/data";
/// The inner container's base rootfs in the image.
pub const BASE_ROOTFS: &str = "/usr/share/nestbox/rootfs";
/// The data disk, found by its virtio serial.
pub const DATA_DEVICE: &str = "virtio:nestbox-data";
/// The data disk's virtio-blk serial.
pub const DATA_SERIAL: &str = "nestbox-data";
/// Where the guest mounts the user disk (the container's writable layer).
pub const USER_DIR: &str = "/user";
/// The user disk, found by its virtio serial.
pub const USER_DEVICE: &str = "virtio:nestbox-user";
/// The user disk's virtio-blk serial.
pub const USER_SERIAL: &str = "nestbox-user";
/// The config disk's virtio-blk serial.
pub const CONFIG_SERIAL: &str = "nestbox-config";
/// The guest's network interface.
pub const INTERFACE: &str = "eth0";

/// Top-level keys the launcher owns.
const OWNED: [&str; 10] = [
    "name",
    "domain",
    "primary_port",
    "data_dir",
    "base_rootfs",
    "data_device",
    "user_dir",
    "user_device",
    "network",
    "storage",
];

/// What the launcher puts into a guest's configuration.
#[derive(Clone, Debug)]
pub struct GuestSettings<'a> {
    /// The VM's name.
    pub name: &'a str,
    /// The domain its names live under.
    pub domain: &'a str,
    /// The port served at `https://NAME.DOMAIN/`.
    pub primary_port: u16,
    /// SHA-256 of the API token, 64 hex digits.
    pub token_sha256: &'a str,
    /// The guest's address.
    pub address: Ipv4Addr,
    /// The pool's prefix length.
    pub prefix_len: u8,
    /// The host's address on the tap.
    pub gateway: Ipv4Addr,
    /// Whether the VM has a user disk (see [`crate::state::record::VmRecord::user_disk`]).
    pub user_disk: bool,
    /// `[storage]` of `launcher.toml`, if set.
    pub storage: Option<&'a Table>,
    /// `create --from`: the prefix (`bucket/prefix`, or a URL) and the
    /// checkpoint to build the user's disk from.
    pub from: Option<(&'a str, &'a str)>,
}

/// Checks `[storage]` of `launcher.toml`: a `url` that is `s3://BUCKET[/PREFIX]`
/// or `file:///DIR`, and none of the keys the launcher sets.
///
/// # Errors
/// The key and what is wrong.
pub fn check_storage(storage: &Table) -> Result<(), (&'static str, String)> {
    match storage.get("url").and_then(Value::as_str) {
        Some(url) if url.starts_with("s3://") && url.len() > 5 => {}
        Some(url) if url.starts_with("file:///") => {}
        _ => {
            return Err((
                "url",
                "must be \"s3://BUCKET/PREFIX\" (each VM gets PREFIX/NAME) or \"file:///DIR\""
                    .into(),
            ));
        }
    }
    if storage.contains_key("from") {
        return Err(("from", "is set by `create --from`, per VM".into()));
    }
    Ok(())
}

/// The store URL a `--from` prefix names: `bucket/prefix` is on the
/// configured S3 store; a full URL is taken as it is.
fn from_url(prefix: &str) -> String {
    if prefix.contains("://") {
        prefix.trim_end_matches('/').to_owned()
    } else {
        format!("s3://{}", prefix.trim_matches('/'))
    }
}

/// Checks the `[guest]` template: it must not set what the launcher sets.
///
/// # Errors
/// The first such key, dotted (`api.token_sha256`).
pub fn check_template(template: &Table) -> Result<(), String> {
    if let Some(key) = OWNED.iter().find(|k| template.contains_key(**k)) {
        return Err((*key).to_owned());
    }
    if template
        .get("api")
        .and_then(Value::as_table)
        .is_some_and(|api| api.contains_key("token_sha256"))
    {
        return Err("api.token_sha256".into());
    }
    Ok(())
}

/// The guest configuration document: `template` with the launcher's keys
/// added (`template` is checked by [`check_template`] at load).
#[must_use]
pub fn render(settings: &GuestSettings<'_>, template: &Table) -> String {
    let mut doc = template.clone();
    let mut set = |key: &str, value: Value| {
        doc.insert(key.to_owned(), value);
    };
    set("name", settings.name.into());
    set("domain", settings.domain.into());
    set("primary_port", i64::from(settings.primary_port).into());
    set("data_dir", DATA_DIR.into());
    set("base_rootfs", BASE_ROOTFS.into());
    set("data_device", DATA_DEVICE.into());
    if settings.user_disk {
        set("user_dir", USER_DIR.into());
        set("user_device", USER_DEVICE.into());
    }
    let mut network = Table::new();
    network.insert("interface".into(), INTERFACE.into());
    network.insert("address".into(), settings.address.to_string().into());
    network.insert("prefix_len".into(), i64::from(settings.prefix_len).into());
    network.insert("gateway".into(), settings.gateway.to_string().into());
    doc.insert("network".into(), Value::Table(network));
    if let Some(template) = settings.storage {
        let mut storage = template.clone();
        if let Some(Value::String(url)) = storage.get_mut("url") {
            *url = format!("{}/{}", url.trim_end_matches('/'), settings.name);
        }
        if let Some((prefix, checkpoint)) = settings.from {
            let mut from = Table::new();
            from.insert("url".into(), from_url(prefix).into());
            from.insert("checkpoint".into(), checkpoint.into());
            storage.insert("from".into(), Value::Table(from));
        }
        doc.insert("storage".into(), Value::Table(storage));
    }
    let api = doc
        .entry("api")
        .or_insert_with(|| Value::Table(Table::new()));
    if let Value::Table(api) = api {
        api.insert("token_sha256".into(), settings.token_sha256.into());
    } else {
        // `api` as a non-table would fail in the guest anyway; replace it
        // so the token hash always arrives.
        let mut table = Table::new();
        table.insert("token_sha256".into(), settings.token_sha256.into());
        *api = Value::Table(table);
    }
    toml::to_string(&doc).expect("a TOML table serializes")
}

/// The config disk's bytes: `text`, at least one NUL, padded to a multiple
/// of 512.
#[must_use]
pub fn disk_image(text: &str) -> Vec<u8> {
    let mut bytes = text.as_bytes().to_vec();
    let len = (bytes.len() / 512 + 1) * 512;
    bytes.resize(len, 0);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn settings() -> GuestSettings<'static> {
        GuestSettings {
            name: "vm1",
            domain: "test",
            primary_port: 8080,
            token_sha256: HASH,
            address: Ipv4Addr::new(10, 123, 0, 2),
            prefix_len: 16,
            gateway: Ipv4Addr::new(10, 123, 0, 1),
            user_disk: true,
            storage: None,
            from: None,
        }
    }

    #[test]
    fn each_vm_gets_its_own_prefix_and_a_rebuild_its_source() {
        let storage: Table = toml::from_str(
            "url = \"s3://bucket/nestbox/\"\nendpoint = \"http://10.1.0.2:8333\"\n\
             access_key_id = \"id\"\nsecret_access_key = \"secret\"\nallow_http = true\n",
        )
        .unwrap();
        check_storage(&storage).unwrap();
        let doc: Table = toml::from_str(&render(
            &GuestSettings {
                storage: Some(&storage),
                from: Some(("bucket/nestbox/old", "v3")),
                ..settings()
            },
            &Table::new(),
        ))
        .unwrap();
        let s = &doc["storage"];
        assert_eq!(s["url"].as_str(), Some("s3://bucket/nestbox/vm1"));
        assert_eq!(s["endpoint"].as_str(), Some("http://10.1.0.2:8333"));
        assert_eq!(s["secret_access_key"].as_str(), Some("secret"));
        assert_eq!(s["from"]["url"].as_str(), Some("s3://bucket/nestbox/old"));
        assert_eq!(s["from"]["checkpoint"].as_str(), Some("v3"));
        let doc: Table = toml::from_str(&render(&settings(), &Table::new())).unwrap();
        assert!(!doc.contains_key("storage"));
    }

    #[test]
    fn the_launcher_keys_and_the_template_make_one_document() {
        let template: Table = toml::from_str(
            "[ingress]\nhttps = \"0.0.0.0:443\"\n[ingress.acme]\ndirectory = \"https://ca.test/dir\"\n\
             ca_root_pem = \"-----BEGIN CERTIFICATE-----\\nMIIB\\n-----END CERTIFICATE-----\\n\"\n\
             [api]\nlisten = \"127.0.0.1:7071\"\n",
        )
        .unwrap();
        check_template(&template).unwrap();
        let text = render(&settings(), &template);
        let doc: Table = toml::from_str(&text).unwrap();
        assert_eq!(doc["name"].as_str(), Some("vm1"));
        assert_eq!(doc["domain"].as_str(), Some("test"));
        assert_eq!(doc["primary_port"].as_integer(), Some(8080));
        assert_eq!(doc["data_dir"].as_str(), Some("/data"));
        assert_eq!(doc["base_rootfs"].as_str(), Some(BASE_ROOTFS));
        assert_eq!(doc["data_device"].as_str(), Some("virtio:nestbox-data"));
        assert_eq!(doc["user_dir"].as_str(), Some("/user"));
        assert_eq!(doc["user_device"].as_str(), Some("virtio:nestbox-user"));
        assert_eq!(doc["api"]["token_sha256"].as_str(), Some(HASH));
        assert_eq!(doc["api"]["listen"].as_str(), Some("127.0.0.1:7071"));
        let net = &doc["network"];
        assert_eq!(net["interface"].as_str(), Some("eth0"));
        assert_eq!(net["address"].as_str(), Some("10.123.0.2"));
        assert_eq!(net["prefix_len"].as_integer(), Some(16));
        assert_eq!(net["gateway"].as_str(), Some("10.123.0.1"));
        assert_eq!(
            doc["ingress"]["acme"]["ca_root_pem"].as_str(),
            Some("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
        );
        assert_eq!(doc["ingress"]["https"].as_str(), Some("0.0.0.0:443"));
    }

    #[test]
    fn an_empty_template_still_gives_a_complete_document() {
        let doc: Table = toml::from_str(&render(&settings(), &Table::new())).unwrap();
        assert_eq!(doc["api"]["token_sha256"].as_str(), Some(HASH));
        assert_eq!(doc.len(), 10, "{doc:?}");
        let old = GuestSettings {
            user_disk: false,
            ..settings()
        };
        let doc: Table = toml::from_str(&render(&old, &Table::new())).unwrap();
        assert!(!doc.contains_key("user_device") && !doc.contains_key("user_dir"));
    }

    #[test]
    fn the_template_may_not_set_launcher_keys() {
        for (text, key) in [
            ("name = \"x\"", "name"),
            ("primary_port = 1", "primary_port"),
            ("[network]\ngateway = \"1.1.1.1\"", "network"),
            ("[api]\ntoken_sha256 = \"x\"", "api.token_sha256"),
        ] {
            let template: Table = toml::from_str(text).unwrap();
            assert_eq!(check_template(&template), Err(key.to_owned()));
        }
    }

    #[test]
    fn the_disk_is_the_text_then_nul_padding_to_whole_sectors() {
        let disk = disk_image("name = \"vm1\"\n");
        assert_eq!(disk.len(), 512);
        assert!(disk.starts_with(b"name = \"vm1\"\n\0"));
        assert!(disk[13..].iter().all(|&b| b == 0));
        assert_eq!(disk_image(&"x".repeat(512)).len(), 1024, "always one NUL");
        assert_eq!(disk_image(&"x".repeat(600)).len(), 1024);
        assert_eq!(disk_image("").len(), 512);
    }
}
