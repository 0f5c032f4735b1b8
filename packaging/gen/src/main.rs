//! `vrdma-pkg-gen`: writes the man pages and the Debian package's systemd unit (see the
//! crate's documentation); with `--check`, writes nothing and fails if any committed file is
//! not what the code gives.

use std::process::ExitCode;

fn main() -> ExitCode {
    let check = match std::env::args().nth(1).as_deref() {
        None => false,
        Some("--check") => true,
        Some(other) => {
            eprintln!("vrdma-pkg-gen: unknown argument {other:?} (usage: vrdma-pkg-gen [--check])");
            return ExitCode::from(2);
        }
    };
    let outputs = match vrdma_pkg_gen::outputs() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("vrdma-pkg-gen: {e}");
            return ExitCode::FAILURE;
        }
    };
    let root = vrdma_pkg_gen::workspace();
    let mut stale = 0;
    for (path, contents) in outputs {
        let full = root.join(&path);
        if std::fs::read(&full).ok().as_deref() == Some(&contents[..]) {
            continue;
        }
        if check {
            eprintln!("vrdma-pkg-gen: {} is stale", path.display());
            stale += 1;
            continue;
        }
        let written = full
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&full, &contents));
        if let Err(e) = written {
            eprintln!("vrdma-pkg-gen: {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("wrote {}", path.display());
    }
    if stale > 0 {
        eprintln!("vrdma-pkg-gen: run `cargo run -p vrdma-pkg-gen` and commit the result");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
