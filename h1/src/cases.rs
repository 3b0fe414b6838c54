//! The case file format of `h1/tests/requests.cases`: hostile and ordinary
//! requests with the outcome the front must give, read by this crate's tests and
//! by the proxy's end-to-end suite (both engines).
//!
//! ```text
//! === name
//! source: where the case comes from
//! expect: reject 400        (or `reject 400|505`, or `forward 2`)
//! > POST / HTTP/1.1\r\n     (data lines: escapes \r \n \t \\ \xHH)
//! ```

/// What the front must do with a case's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// The first answer has one of these statuses and no request is forwarded.
    Reject(Vec<u16>),
    /// This many requests reach the backend, and each is answered.
    Forward(usize),
}

#[derive(Debug, Clone)]
pub struct Case {
    pub name: String,
    pub source: String,
    pub expect: Expect,
    pub data: Vec<u8>,
}

fn unescape(line: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let bytes = line.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'\\' {
            out.push(bytes[i]);
            i += 1;
            continue;
        }
        match bytes.get(i + 1) {
            Some(b'r') => out.push(b'\r'),
            Some(b'n') => out.push(b'\n'),
            Some(b't') => out.push(b'\t'),
            Some(b'\\') => out.push(b'\\'),
            Some(b'x') => {
                let hex = line.get(i + 2..i + 4).ok_or("short \\x escape")?;
                out.push(u8::from_str_radix(hex, 16).map_err(|e| e.to_string())?);
                i += 2;
            }
            _ => return Err(format!("unknown escape in {line:?}")),
        }
        i += 2;
    }
    Ok(out)
}

fn expectation(text: &str) -> Result<Expect, String> {
    let mut words = text.split_whitespace();
    match (words.next(), words.next()) {
        (Some("reject"), Some(statuses)) => statuses
            .split('|')
            .map(|s| s.parse().map_err(|_| format!("bad status in {text:?}")))
            .collect::<Result<_, _>>()
            .map(Expect::Reject),
        (Some("forward"), Some(n)) => n
            .parse()
            .map(Expect::Forward)
            .map_err(|_| format!("bad count in {text:?}")),
        _ => Err(format!("bad expectation {text:?}")),
    }
}

/// Reads a case file.
pub fn parse(text: &str) -> Result<Vec<Case>, String> {
    let mut cases: Vec<Case> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}", n + 1);
        if let Some(name) = line.strip_prefix("=== ") {
            cases.push(Case {
                name: name.trim().to_owned(),
                source: String::new(),
                expect: Expect::Forward(0),
                data: Vec::new(),
            });
            continue;
        }
        let Some(case) = cases.last_mut() else {
            continue;
        };
        if let Some(source) = line.strip_prefix("source: ") {
            case.source = source.to_owned();
        } else if let Some(expect) = line.strip_prefix("expect: ") {
            case.expect = expectation(expect).map_err(at)?;
        } else if let Some(data) = line.strip_prefix("> ") {
            case.data.extend(unescape(data).map_err(at)?);
        }
    }
    Ok(cases)
}

/// The cases of `h1/tests/requests.cases`.
pub fn requests() -> Vec<Case> {
    // Checked by this crate's own tests: a file that does not parse fails there.
    parse(include_str!("../tests/requests.cases")).unwrap_or_default()
}
