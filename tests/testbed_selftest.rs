//! The test-bed's own stand-ins checked against what they stand in for: the lifecycle-hook
//! emulation (tests/testbed/lifecycle.py behind faultproxy.py and imds.py), driven with
//! boto3 as the agent's SDK would (`tests/testbed/lifecycle_selftest.py`: success answers,
//! AWS's ValidationError shape, heartbeats pushing the deadline, default results on
//! timeout, injected faults, concurrent writers, IMDS target-lifecycle-state). The rolling
//! tests rest on it; if it drifted from AWS's behaviour they would prove nothing.

mod common;

use std::process::Command;

#[test]
fn the_lifecycle_emulation_answers_as_auto_scaling_does() {
    // Block 127.0.54: no other test uses it (the script's default, 127.0.9, is demo.sh's).
    // Bounded: the script bounds its own waits (about 15 s in all); this is the backstop.
    let out = Command::new("timeout")
        .args(["--kill-after=10", "180"])
        .arg(common::python())
        .arg(common::testbed_script("lifecycle_selftest.py"))
        .args(["--block", "127.0.54"])
        .output()
        .expect("run lifecycle_selftest.py");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "lifecycle_selftest.py failed:\n{text}"
    );
    assert!(text.contains("PASS"), "{text}");
}
