//! `ErrorChain` names every cause of an error, outermost first.

use std::fmt;

use vrdma_proto::ErrorChain;

#[derive(Debug)]
struct Innermost;

impl fmt::Display for Innermost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("permission denied")
    }
}

impl std::error::Error for Innermost {}

#[derive(Debug)]
struct Wrapper(&'static str, Box<dyn std::error::Error + 'static>);

impl fmt::Display for Wrapper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for Wrapper {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.1.as_ref())
    }
}

#[test]
fn every_cause_is_named_outermost_first() {
    let err = Wrapper(
        "cannot start",
        Box::new(Wrapper("cannot listen on /run/x.sock", Box::new(Innermost))),
    );
    assert_eq!(
        ErrorChain(&err).to_string(),
        "cannot start: cannot listen on /run/x.sock: permission denied"
    );
    assert_eq!(ErrorChain(&Innermost).to_string(), "permission denied");
}
