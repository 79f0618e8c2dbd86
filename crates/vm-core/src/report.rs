//! Errors as one line, for logs and API answers.

/// An error and its sources on one line: "cannot restore: vm.state is truncated: ...".
pub fn flatten_error(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
