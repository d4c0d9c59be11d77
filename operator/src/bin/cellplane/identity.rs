//! Who is asking (reads local files only): the operating system's user behind this process
//! (by uid, from the password database, not the `USER` variable a shell can set to anything)
//! and, where a kubeconfig names one, the Kubernetes user of its current context. Recorded
//! as an operation's `startedBy`. Until the global etcd authenticates its clients (mTLS),
//! this is what the machine says, not a proof.

use std::path::PathBuf;

/// `os:alice (uid 1000) on host-1, kube:admin@prod` (the parts that are known).
pub fn who() -> String {
    let mut parts = Vec::new();
    let uid = own_uid();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty());
    let on = host.map(|h| format!(" on {h}")).unwrap_or_default();
    match (uid, uid.and_then(user_name)) {
        (Some(uid), Some(name)) => parts.push(format!("os:{name} (uid {uid}){on}")),
        (Some(uid), None) => parts.push(format!("os:uid {uid}{on}")),
        _ => parts.push(format!("os:unknown user{on}")),
    }
    if let Some(user) = kube_user() {
        parts.push(format!("kube:{user}"));
    }
    parts.join(", ")
}

/// This process's real uid (`/proc/self/status`).
fn own_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    uid_from_status(&status)
}

fn uid_from_status(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The login name of `uid` in `/etc/passwd`.
fn user_name(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    name_in_passwd(&passwd, uid)
}

fn name_in_passwd(passwd: &str, uid: u32) -> Option<String> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let id: u32 = fields.nth(1)?.parse().ok()?;
        (id == uid).then(|| name.to_string())
    })
}

/// The user of the kubeconfig's current context (`KUBECONFIG`'s first file, or
/// `~/.kube/config`).
fn kube_user() -> Option<String> {
    let path = match std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty()) {
        Some(v) => std::env::split_paths(&v).next()?,
        None => PathBuf::from(std::env::var_os("HOME")?).join(".kube/config"),
    };
    let text = std::fs::read_to_string(path).ok()?;
    current_context_user(&text)
}

fn current_context_user(kubeconfig: &str) -> Option<String> {
    let config: serde_yaml::Value = serde_yaml::from_str(kubeconfig).ok()?;
    let current = config.get("current-context")?.as_str()?;
    config
        .get("contexts")?
        .as_sequence()?
        .iter()
        .find(|c| c.get("name").and_then(|n| n.as_str()) == Some(current))?
        .get("context")?
        .get("user")?
        .as_str()
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_os_user_comes_from_the_uid_and_the_kube_user_from_the_current_context() {
        assert_eq!(
            uid_from_status("Name:\tx\nUid:\t1000\t1000\t1000\t1000\n"),
            Some(1000)
        );
        let passwd = "root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000::/home/alice:/bin/sh\n";
        assert_eq!(name_in_passwd(passwd, 1000).as_deref(), Some("alice"));
        assert_eq!(name_in_passwd(passwd, 7), None);
        let kubeconfig = "current-context: prod\ncontexts:\n- name: dev\n  context: {user: dev-user}\n- name: prod\n  context: {cluster: c, user: admin@prod}\n";
        assert_eq!(
            current_context_user(kubeconfig).as_deref(),
            Some("admin@prod")
        );
        assert_eq!(current_context_user("contexts: []"), None);
        let me = who();
        assert!(me.starts_with("os:"), "{me}");
        assert!(
            !me.contains("unknown user"),
            "this test runs as a known user: {me}"
        );
    }
}
