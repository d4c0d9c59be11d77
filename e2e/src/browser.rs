//! A real headless browser (Debian's `chromium`) for the pages the platform serves: the
//! DOM as a person's browser builds it (scripts run, fetches answered), and screenshots.

use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::Command;

/// Chromium in headless mode with the given extra arguments, on `url`; its stdout.
fn chromium(url: &str, extra: &[&str]) -> Result<String> {
    let profile = tempfile_dir()?;
    let out = Command::new("chromium")
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            // Scripts run and their timers fire within this much virtual time; network
            // fetches pause it.
            "--virtual-time-budget=4000",
            "--window-size=1400,900",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .output()
        .context("running chromium (e2e/bin/setup installs it)")?;
    let _ = std::fs::remove_dir_all(&profile);
    if !out.status.success() {
        bail!(
            "chromium exited {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn tempfile_dir() -> Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!(
        "cellplane-chromium-{}-{}",
        std::process::id(),
        crate::free_port()?
    ));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// The page's DOM after its scripts ran.
pub fn dom(url: &str) -> Result<String> {
    chromium(url, &["--dump-dom"])
}

/// A PNG of the page as a person sees it, written to `path`.
pub fn screenshot(url: &str, path: &Path) -> Result<()> {
    chromium(url, &[&format!("--screenshot={}", path.display())])?;
    anyhow::ensure!(
        path.exists(),
        "chromium wrote no screenshot to {}",
        path.display()
    );
    Ok(())
}

/// The value of `attr` on the first element carrying `key="value"` in `dom`.
pub fn attr_of(dom: &str, key: &str, value: &str, attr: &str) -> Option<String> {
    let at = dom.find(&format!("{key}=\"{value}\""))?;
    let start = dom[..at].rfind('<')?;
    let end = at + dom[at..].find('>')?;
    let tag = &dom[start..end];
    let from = tag.find(&format!("{attr}=\""))? + attr.len() + 2;
    let len = tag[from..].find('"')?;
    Some(tag[from..from + len].to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn attributes_are_read_from_the_element_that_carries_the_key() {
        let dom = r#"<div class="cell Active" data-cell="a" data-state="Active"><span>x</span></div><div data-state="Frozen" data-cell="b">"#;
        assert_eq!(
            super::attr_of(dom, "data-cell", "a", "data-state").as_deref(),
            Some("Active")
        );
        assert_eq!(
            super::attr_of(dom, "data-cell", "b", "data-state").as_deref(),
            Some("Frozen")
        );
        assert_eq!(super::attr_of(dom, "data-cell", "c", "data-state"), None);
    }
}
