//! The committed man pages and the package's unit are what the code gives, and the pages say
//! what the programs accept.

use std::collections::BTreeSet;

use vrdma_pkg_gen::{
    PACKAGE_UNIT, SOURCE_UNIT, devinfo_command, outputs, packaged_unit, workspace,
};

#[test]
fn committed_files_are_current() {
    let mut stale = Vec::new();
    for (path, contents) in outputs().unwrap() {
        let committed = std::fs::read(workspace().join(&path)).unwrap_or_default();
        if committed != contents {
            stale.push(path.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "stale: {stale:?}; run `cargo run -p vrdma-pkg-gen` and commit the result"
    );
}

#[test]
fn packaged_unit_differs_from_its_source_only_in_the_path_and_header() {
    let source = std::fs::read_to_string(workspace().join(SOURCE_UNIT)).unwrap();
    let packaged = std::fs::read_to_string(workspace().join(PACKAGE_UNIT)).unwrap();
    let exec = |unit: &str| {
        unit.lines()
            .filter(|l| l.starts_with("ExecStart="))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        exec(&source),
        [
            "ExecStart=/usr/local/bin/vhost-user-rdma --control-socket /run/vrdma/control/vrdmactl.sock $VRDMA_ARGS"
        ]
    );
    assert_eq!(
        exec(&packaged),
        [
            "ExecStart=/usr/bin/vhost-user-rdma --control-socket /run/vrdma/control/vrdmactl.sock $VRDMA_ARGS"
        ]
    );
    let settings = |unit: &str| {
        unit.lines()
            .filter(|l| !l.starts_with('#') && !l.starts_with("ExecStart="))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(settings(&source), settings(&packaged));
    // A unit with a second ExecStart, or another path, is refused rather than half-rewritten.
    assert!(packaged_unit(&source.replace("/usr/local/bin/", "/opt/")).is_err());
    assert!(
        packaged_unit(&format!(
            "{source}ExecStart=/usr/local/bin/vhost-user-rdma x\n"
        ))
        .is_err()
    );
}

/// The options in `vrdma-devinfo`'s own usage text (`-s, --socket=PATH ...` lines), as
/// (short, long, value name) triples.
fn usage_options(usage: &str) -> BTreeSet<(char, String, Option<String>)> {
    usage
        .lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with('-') && l.as_bytes().get(2) == Some(&b','))
        .map(|l| {
            let short = l.chars().nth(1).unwrap();
            let long = l[4..].split_whitespace().next().unwrap();
            let (long, value) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v.to_owned())),
                None => (long, None),
            };
            (short, long.trim_start_matches("--").to_owned(), value)
        })
        .collect()
}

#[test]
fn devinfo_page_matches_its_usage() {
    let source =
        std::fs::read_to_string(workspace().join("guest-lib/src/bin/vrdma-devinfo.rs")).unwrap();
    let usage = source
        .split("const USAGE: &str = \"")
        .nth(1)
        .and_then(|rest| rest.split("\";").next())
        .expect("vrdma-devinfo.rs has a USAGE constant");
    let from_usage = usage_options(usage);
    let mut cmd = devinfo_command();
    cmd.build();
    let from_clap: BTreeSet<_> = cmd
        .get_arguments()
        .map(|a| {
            (
                a.get_short().unwrap(),
                a.get_long().unwrap().to_owned(),
                a.get_value_names().map(|v| v[0].to_string()),
            )
        })
        .collect();
    assert_eq!(
        from_clap, from_usage,
        "vrdma-devinfo's options changed: update devinfo_command()"
    );
    assert!(
        from_usage.len() >= 5,
        "parsed too few options: {from_usage:?}"
    );
}

/// vrdmactl's page describes every command the program has.
#[test]
fn vrdmactl_page_has_every_command() {
    use clap::CommandFactory;
    let page = std::fs::read_to_string(workspace().join("man/vrdmactl.1")).unwrap();
    let cmd = vhost_user_rdma::ctl::Args::command();
    let names: Vec<_> = cmd.get_subcommands().map(|c| c.get_name()).collect();
    assert!(names.len() >= 7, "{names:?}");
    for name in names {
        assert!(
            page.contains(&format!("\\fBvrdmactl {name} ")),
            "man/vrdmactl.1 has no entry for vrdmactl {name}"
        );
    }
}
