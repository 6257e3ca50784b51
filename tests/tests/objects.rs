//! Checkpoints in an object store, with *real VMs* and a real `SeaweedFS`
//! (in the allow-listed namespace the VMs reach, as a server on the LAN
//! would be): they are uploaded in the background until durable, a
//! destroyed VM is rebuilt from the bucket with its files, an upload cut
//! by `kill -9` of QEMU resumes and leaves no half-written object, and the
//! container can reach neither the store's credentials nor its objects.

use std::time::{Duration, Instant};

use nestbox_guest::storage::remote::Remote;
use nestbox_tests::seaweed::{self, SECRET, Seaweed};
use nestbox_tests::vms::{Host, body};

const SCRIPT: Duration = Duration::from_mins(3);
/// The user's files' content hashes.
const TREE: &str = "find /srv -type f | sort | xargs md5sum";

/// A host whose VMs upload to `SeaweedFS` under `s3://nestbox/vms/NAME`.
fn host_with_storage(k: u8) -> (Host, Seaweed) {
    let host = Host::new(k);
    let (ip, netns) = host.lan();
    let sw = Seaweed::start(&ip, &host.dir.join("s3"), Some(netns));
    host.add_to_launcher_toml(&sw.launcher_toml("vms"));
    (host, sw)
}

fn lines_of(host: &Host, vm: &str, script: &str) -> Vec<String> {
    host.in_container(vm, script, SCRIPT)
        .into_iter()
        // The service manager's own line about the probe's start.
        .filter(|l| !l.is_empty() && l != "NB-DONE" && !l.starts_with("started, pid "))
        .collect()
}

fn take(host: &Host, vm: &str) -> String {
    let out = host.api(vm, "POST", "/v1/checkpoints", Some("{}"));
    let text = body(&out);
    let last: serde_json::Value =
        serde_json::from_str(text.lines().last().unwrap_or("{}")).unwrap();
    assert_eq!(last["type"], "complete", "{text}");
    last["checkpoint"]["id"].as_str().unwrap().to_owned()
}

fn upload_of(host: &Host, vm: &str, id: &str) -> serde_json::Value {
    let out = host.api(vm, "GET", &format!("/v1/checkpoints/{id}"), None);
    let c: serde_json::Value =
        serde_json::from_str(&body(&out)).unwrap_or_else(|e| panic!("{e}: {}", body(&out)));
    c["upload"].clone()
}

/// Waits until `pred` holds of checkpoint `id`'s upload.
fn wait_upload(
    host: &Host,
    vm: &str,
    id: &str,
    within: Duration,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let up = upload_of(host, vm, id);
        if pred(&up) {
            return up;
        }
        assert!(
            Instant::now() < deadline,
            "{vm}/{id}: the upload never got there: {up}\nconsole:\n{}",
            host.console(vm)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn durable(host: &Host, vm: &str, id: &str) -> serde_json::Value {
    wait_upload(host, vm, id, Duration::from_mins(5), |u| {
        u["state"] == "durable"
    })
}

fn contents(remote: &Remote) -> seaweed::Contents {
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(seaweed::contents(remote))
}

/// The container looks for the store's secret everywhere it can see (its
/// files, every process's environment and command line), for a block
/// device to read the config disk with, and at the bucket without
/// credentials.
fn the_container_cannot_reach_the_credentials(host: &Host, vm: &str, sw: &Seaweed) {
    // The secret is never spelled in the script, and
    // no process that has it in its arguments runs while /proc is read.
    let (a, b) = SECRET.split_at(6);
    let probe = format!(
        "P='{a}'; S=\"${{P}}{b}\"; \
         has() {{ tr '\\0' '\\n' < \"$1\" | grep -qF \"$S\"; }}; \
         find / -xdev -type f 2>/dev/null | while read -r f; do has \"$f\" && echo \"FOUND-IN-FILES $f\"; done; \
         cat /proc/[0-9]*/environ /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' '\\n' > /tmp/proc; \
         has /tmp/proc && echo FOUND-IN-PROC; \
         printf 'x\\0%s\\0' \"$S\" > /tmp/control; has /tmp/control && echo CONTROL-FOUND; \
         ls /dev | grep -E '^(vd|sd|xvd|nvme)' && echo BLOCK-DEVICE; \
         mknod /tmp/disk b 254 0 2>/dev/null && echo MKNOD-WORKED; \
         wget -q -O /tmp/list http://{ip}:8333/nestbox/ 2>/dev/null && echo ANONYMOUS-LIST; \
         test -e /.nestbox/checkpoints/v0/srv/app/b && echo VIEW-OK",
        ip = sw
            .endpoint()
            .trim_start_matches("http://")
            .split(':')
            .next()
            .unwrap(),
    );
    // (CONTROL-FOUND: the search finds the secret where it is, after a NUL.)
    assert_eq!(lines_of(host, vm, &probe), ["CONTROL-FOUND", "VIEW-OK"]);
}

/// The 8 MiB blob, in both v0 and v1, is stored once (`stored`: after
/// v1); a third checkpoint deleted frees exactly its own chunks.
fn stored_once_and_freed_by_its_own(host: &Host, remote: &Remote, stored: &seaweed::Contents) {
    // v1 added only its own small stream's chunks.
    let v0_chunks = stored
        .manifests
        .iter()
        .find(|m| m.id == "v0")
        .unwrap()
        .chunks
        .len();
    let v1_chunks = stored
        .manifests
        .iter()
        .find(|m| m.id == "v1")
        .unwrap()
        .chunks
        .len();
    // (4 MiB at most each.)
    assert!(v0_chunks >= 3, "{v0_chunks} chunks for 8 MiB");
    assert_eq!(
        stored.chunks.len(),
        v0_chunks + v1_chunks,
        "chunks: {:?}",
        stored.chunks
    );
    assert!(v1_chunks <= 2, "{v1_chunks}");
    assert!(
        stored.chunk_bytes < (8 << 20) + (2 << 20),
        "{}",
        stored.chunk_bytes
    );
    lines_of(
        host,
        "src",
        "dd if=/dev/urandom of=/tmp/x bs=1M count=3 2>/dev/null && cp /tmp/x /srv/extra && echo ok",
    );
    assert_eq!(take(host, "src"), "v2");
    durable(host, "src", "v2");
    assert!(contents(remote).chunks.len() > stored.chunks.len());
    let out = host.api("src", "DELETE", "/v1/checkpoints/v2", None);
    assert!(out.status.success(), "{}", body(&out));
    let deadline = Instant::now() + Duration::from_mins(1);
    loop {
        let now = contents(remote);
        if now.chunks == stored.chunks && now.manifests.len() == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "v2's chunks were not freed: {}",
            now.chunks.len()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    lines_of(host, "src", "rm /srv/extra && echo ok");
}

#[test]
fn a_destroyed_vm_is_rebuilt_from_the_bucket_and_the_container_never_reaches_the_credentials() {
    let (mut host, sw) = host_with_storage(73);
    host.create("src");
    lines_of(
        &host,
        "src",
        "mkdir -p /srv/app && echo one > /srv/app/a && echo bee > /srv/app/b && \
         dd if=/dev/urandom of=/srv/app/blob bs=1M count=8 2>/dev/null && echo ok",
    );
    assert_eq!(take(&host, "src"), "v0");
    lines_of(
        &host,
        "src",
        "echo two > /srv/app/a && rm /srv/app/b && echo new > /srv/app/c && echo ok",
    );
    let tree_v1 = lines_of(&host, "src", TREE);
    assert_eq!(tree_v1.len(), 3, "{tree_v1:#?}");
    assert_eq!(take(&host, "src"), "v1");
    let up0 = durable(&host, "src", "v0");
    let up1 = durable(&host, "src", "v1");
    assert!(up0.get("base").is_none(), "v0 is a full stream: {up0}");
    assert_eq!(up1["base"], "v0", "{up1}");
    // v1 changed a few bytes: its incremental stream is small.
    assert!(up1["stream_bytes"].as_u64().unwrap() < 1 << 20, "{up1}");
    let remote = sw.remote("vms/src");
    let stored = contents(&remote);
    let mut ids: Vec<&str> = stored.manifests.iter().map(|m| m.id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["v0", "v1"]);
    stored_once_and_freed_by_its_own(&host, &remote, &stored);

    the_container_cannot_reach_the_credentials(&host, "src", &sw);

    // The VM is destroyed; a new one is built from the bucket.
    host.launcher_ok(&["destroy", "src"]);
    host.created.retain(|n| n != "src");
    host.create_with("dst", &["--from", "nestbox/vms/src@v1"]);
    assert_eq!(lines_of(&host, "dst", TREE), tree_v1);
    let status: serde_json::Value =
        serde_json::from_str(&body(&host.api("dst", "GET", "/v1/status", None))).unwrap();
    let r = &status["rebuild"];
    assert_eq!(r["state"], "done", "{status}");
    assert_eq!(r["from"], "s3://nestbox/vms/src");
    assert_eq!(r["bytes"], r["total_bytes"]);
    let (list, ids) = host.checkpoints("dst");
    assert_eq!(list["head"], "v1", "{list}");
    assert_eq!(ids, ["v0", "v1"], "{list}");
    // The next checkpoint goes on after the source's ids, and everything
    // is uploaded again under the new VM's own prefix.
    assert_eq!(take(&host, "dst"), "v2");
    durable(&host, "dst", "v2");
    let mut ids: Vec<String> = contents(&sw.remote("vms/dst"))
        .manifests
        .into_iter()
        .map(|m| m.id)
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["v0", "v1", "v2"]);
}

#[test]
fn an_upload_cut_by_kill_9_of_qemu_resumes_and_the_bucket_holds_only_whole_objects() {
    let (mut host, mut sw) = host_with_storage(74);
    host.create("up");
    lines_of(
        &host,
        "up",
        "mkdir -p /srv && dd if=/dev/urandom of=/srv/big bs=1M count=288 2>/dev/null && echo ok",
    );
    let tree = lines_of(&host, "up", TREE);
    assert_eq!(take(&host, "up"), "v0");
    // Some of the stream is in the bucket (and in the journal), not all.
    let up = wait_upload(&host, "up", "v0", Duration::from_mins(2), |u| {
        u["state"] != "durable" && u["sent_bytes"].as_u64().unwrap_or(0) > 0
    });
    assert_eq!(up["state"], "uploading", "{up}");
    host.kill_vmm("up");
    let remote = sw.remote("vms/up");
    let cut = contents(&remote);
    assert!(cut.manifests.is_empty(), "a manifest before all its chunks");
    assert!(
        !cut.chunks.is_empty(),
        "nothing was uploaded before the kill"
    );

    // Started again: the upload resumes (the chunks the journal names are
    // not sent again) and the server is killed in the middle of it; the
    // upload is retried once it is back. The link to the server is
    // throttled meanwhile, so that the whole stream cannot slip through
    // before the kill, however fast the host is.
    sw.throttle(Some("16mbit"));
    host.launcher_ok(&["start", "up"]);
    host.wait_ready("up");
    let resumed = wait_upload(&host, "up", "v0", Duration::from_mins(3), |u| {
        assert_ne!(
            u["state"], "durable",
            "the upload ended before the server could be killed in it: {u}"
        );
        u["resumed_chunks"].as_u64().unwrap_or(0) > 0 && u["sent_bytes"].as_u64().unwrap_or(0) > 0
    });
    eprintln!("resumed: {resumed}");
    sw.kill();
    sw.throttle(None);
    let failed = wait_upload(&host, "up", "v0", Duration::from_mins(2), |u| {
        assert_ne!(u["state"], "durable", "durable with the server down: {u}");
        u.get("error").is_some()
    });
    eprintln!("with the server down: {failed}");
    sw.resume();
    let done = durable(&host, "up", "v0");
    assert!(
        done["attempts"].as_u64().unwrap_or(0) >= 2,
        "durable without a retry after the server's kill: {done}"
    );
    let whole = contents(&remote);
    assert_eq!(whole.manifests.len(), 1);
    let m = &whole.manifests[0];
    assert_eq!(m.stream_bytes, done["stream_bytes"].as_u64().unwrap());
    assert!(m.stream_bytes > 288 << 20, "{}", m.stream_bytes);
    // Only the chunks of the stream: nothing half-written, nothing extra
    // once collected.
    assert!(cut.chunks.iter().all(|c| whole.chunks.contains(c)));

    // And the files come back from it.
    host.create_with("up2", &["--from", "nestbox/vms/up@v0"]);
    assert_eq!(lines_of(&host, "up2", TREE), tree);
}
