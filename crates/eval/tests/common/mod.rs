//! Shared by the real-data tests.

/// Whether the fetched asset `path` is there. Missing, the test is skipped (it says so) outside
/// CI, and fails under `CI=true`, where real-data tests must run.
pub fn asset_present(path: &std::path::Path) -> bool {
    if path.exists() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "{} is missing: run scripts/fetch-assets.sh (CI must run real-data tests)",
            path.display()
        );
    }
    eprintln!(
        "SKIPPED: {} not found; run scripts/fetch-assets.sh",
        path.display()
    );
    false
}
