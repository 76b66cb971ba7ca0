//! The `weft` command line, run as a user would.

use weft_protocol::DeviceId;
use weft_tests::weft;

#[test]
fn id_is_created_on_first_use_stable_and_valid() {
    let home = tempfile::tempdir().unwrap();
    let first = weft(home.path(), &["id"]);
    assert!(first.status.success(), "{first:?}");
    let text = String::from_utf8(first.stdout).unwrap();
    let id: DeviceId = text
        .trim()
        .parse()
        .expect("weft id prints a valid device ID");
    let second = weft(home.path(), &["id"]);
    assert_eq!(
        String::from_utf8(second.stdout).unwrap().trim(),
        id.to_string()
    );
    // A different home is a different device.
    let other = tempfile::tempdir().unwrap();
    let third = weft(other.path(), &["id"]);
    assert_ne!(
        String::from_utf8(third.stdout).unwrap().trim(),
        id.to_string()
    );
}

#[test]
fn damaged_key_fails_with_advice_and_keeps_the_file() {
    let home = tempfile::tempdir().unwrap();
    std::fs::write(home.path().join("device.key"), "not a key").unwrap();
    let output = weft(home.path(), &["id"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("device key"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(home.path().join("device.key")).unwrap(),
        "not a key"
    );
}
