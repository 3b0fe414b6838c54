//! The reference reader's own tests, rule by rule.

use super::*;

const S400: Result<(), Reject> = Err(Reject::Status(400));

fn ok(s: &[u8]) -> Request {
    match parse_head(s) {
        Ok(r) => r,
        Err(e) => panic!(
            "expected Ok for {:?}, got {:?}",
            String::from_utf8_lossy(s),
            e
        ),
    }
}
fn rej(s: &[u8]) -> Reject {
    match parse_head(s) {
        Ok(r) => panic!(
            "expected reject for {:?}, got {:?}",
            String::from_utf8_lossy(s),
            r
        ),
        Err(e) => e,
    }
}
fn st(s: &[u8]) -> Result<(), Reject> {
    parse_head(s).map(|_| ())
}
/// "GET / HTTP/1.1\r\nHost: h\r\n" + extra + "\r\n"
fn get_with(extra: &str) -> Vec<u8> {
    format!("GET / HTTP/1.1\r\nHost: h\r\n{}\r\n", extra).into_bytes()
}
fn line(target: &str) -> Vec<u8> {
    format!("GET {} HTTP/1.1\r\nHost: h\r\n\r\n", target).into_bytes()
}
fn field(name: &str, value: &str) -> (Vec<u8>, Vec<u8>) {
    (name.as_bytes().to_vec(), value.as_bytes().to_vec())
}

// ---- core rules -------------------------------------------------------

#[test]
fn tchar_exact_set() {
    let spec = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    for b in 0..=255u8 {
        assert_eq!(is_tchar(b), spec.contains(&b), "byte {:#x}", b);
    }
}

#[test]
fn token_rules() {
    assert!(is_token(b"GET"));
    assert!(is_token(b"X-Custom_1~"));
    assert!(!is_token(b""));
    assert!(!is_token(b"a b"));
    assert!(!is_token(b"a:"));
    assert!(!is_token(b"a\"b"));
    assert!(!is_token(b"(x)"));
    assert!(!is_token(&[0x80]));
}

#[test]
fn ows_trim() {
    assert_eq!(trim_ows(b" \t a b \t"), b"a b");
    assert_eq!(trim_ows(b"   "), b"");
    assert_eq!(trim_ows(b""), b"");
    assert_eq!(skip_ows(b"  x", 0), 2);
}

#[test]
fn field_vchar_and_obs_text() {
    assert!(is_field_vchar(0x21) && is_field_vchar(0x7e));
    assert!(is_field_vchar(0x80) && is_field_vchar(0xff));
    assert!(is_obs_text(0x80) && !is_obs_text(0x7f));
    assert!(!is_field_vchar(0x7f) && !is_field_vchar(SP) && !is_field_vchar(0));
}

#[test]
fn field_value_rule() {
    assert!(is_field_value(b""));
    assert!(is_field_value(b"a"));
    assert!(is_field_value(b"a \t b"));
    assert!(is_field_value(&[b'a', 0xff, b'b']));
    assert!(!is_field_value(b" a"));
    assert!(!is_field_value(b"a "));
    assert!(!is_field_value(b"a\0b"));
    assert!(!is_field_value(b"a\x7fb"));
    assert!(!is_field_value(b"a\x1bb"));
    assert!(!is_field_value(b"a\rb"));
}

#[test]
fn quoted_string_rule() {
    assert_eq!(match_quoted_string(b"\"abc\"", 0), Some(5));
    assert_eq!(match_quoted_string(b"\"\"", 0), Some(2));
    assert_eq!(match_quoted_string(b"\"a\\\"b\"x", 0), Some(6));
    assert_eq!(match_quoted_string(b"\"a b\tc\"", 0), Some(7));
    assert_eq!(match_quoted_string(&[b'"', 0x80, b'"'], 0), Some(3));
    assert_eq!(match_quoted_string(b"\"abc", 0), None);
    assert_eq!(match_quoted_string(b"\"a\\", 0), None);
    assert_eq!(match_quoted_string(b"\"a\x01\"", 0), None);
    assert_eq!(match_quoted_string(b"\"a\\\x01\"", 0), None);
    assert_eq!(match_quoted_string(b"abc", 0), None);
}

#[test]
fn pct_encoded_rule() {
    assert_eq!(match_pct_encoded(b"%2F", 0), Some(3));
    assert_eq!(match_pct_encoded(b"%aF", 0), Some(3));
    assert_eq!(match_pct_encoded(b"%zz", 0), None);
    assert_eq!(match_pct_encoded(b"%2", 0), None);
    assert_eq!(match_pct_encoded(b"%", 0), None);
    assert_eq!(match_pct_encoded(b"a2F", 0), None);
}

#[test]
fn pchar_set() {
    for &b in b"azAZ09-._~!$&'()*+,;=:@" {
        assert_eq!(match_pchar(&[b], 0), Some(1), "{}", b as char);
    }
    for &b in b"/?#\"<>[\\]^`{|} \x7f" {
        assert_eq!(match_pchar(&[b], 0), None, "{}", b as char);
    }
    assert_eq!(match_pchar(&[0xc3], 0), None);
}

#[test]
fn origin_form_rule() {
    for t in [
        "/", "//", "/a/b/", "/a?b=c&d", "/a?b?c/d", "/?", "/%41%7e", "/a:b@c",
    ] {
        assert!(is_origin_form(t.as_bytes()), "{}", t);
    }
    for t in [
        "", "a", "a/", "/a b", "/a#f", "/%zz", "/%4", "/a\"", "/<", "/[", "/\\", "/{", "/|", "/^",
        "/`",
    ] {
        assert!(!is_origin_form(t.as_bytes()), "{}", t);
    }
    assert!(!is_origin_form(&[b'/', 0xc3, 0xa9]));
}

#[test]
fn reg_name_rule() {
    assert!(is_reg_name(b"example.com"));
    assert!(is_reg_name(b"ex%41mple"));
    assert!(is_reg_name(b"a!$&'()*+,;=b"));
    assert!(is_reg_name(b""));
    assert!(!is_reg_name(b"a b"));
    assert!(!is_reg_name(b"a@b"));
    assert!(!is_reg_name(b"a:b"));
    assert!(!is_reg_name(b"a%zz"));
    assert!(!is_reg_name(b"a/b"));
}

#[test]
fn dec_octet_and_ipv4() {
    for s in [
        "0", "9", "10", "99", "100", "199", "200", "249", "250", "255",
    ] {
        assert!(is_dec_octet(s.as_bytes()), "{}", s);
    }
    for s in ["", "00", "01", "256", "260", "300", "1000", "a"] {
        assert!(!is_dec_octet(s.as_bytes()), "{}", s);
    }
    assert!(is_ipv4address(b"1.2.3.4"));
    assert!(is_ipv4address(b"255.255.255.255"));
    assert!(!is_ipv4address(b"1.2.3"));
    assert!(!is_ipv4address(b"1.2.3.4.5"));
    assert!(!is_ipv4address(b"256.1.1.1"));
    assert!(!is_ipv4address(b"01.1.1.1"));
    // ...but those are still reg-names, hence valid hosts:
    assert!(is_uri_host(b"256.1.1.1"));
}

#[test]
fn ip_literal_exact() {
    for s in [
        "[::1]",
        "[::]",
        "[2001:db8::1]",
        "[::ffff:1.2.3.4]",
        "[FE80::A]",
    ] {
        assert!(is_ip_literal(s.as_bytes()), "{}", s);
    }
    // Exact: not a valid IPv6address.
    assert!(!is_ip_literal(b"[:::::::::]"));
    assert!(!is_ip_literal(b"[1:1]"));
    for s in [
        "[]",
        "[1.2.3.4]",
        "[:1]",
        "[v1.x]",
        "[::1%25eth0]",
        "[::g]",
        "[::1",
        "::1]",
        "[ ::1]",
    ] {
        assert!(!is_ip_literal(s.as_bytes()), "{}", s);
    }
}

#[test]
fn port_rule() {
    assert!(is_port(b""));
    assert!(is_port(b"80"));
    assert!(is_port(b"65535"));
    assert!(!is_port(b"65536"));
    assert!(!is_port(b"000080"));
    assert!(!is_port(b"8a"));
    assert!(!is_port(b"-1"));
}

#[test]
fn host_value_rule() {
    for s in [
        "example.com",
        "example.com:8080",
        "example.com:",
        "[::1]:80",
        "[::1]",
        "1.2.3.4:1",
        "EX%41.com",
    ] {
        assert!(is_host_value(s.as_bytes()), "{}", s);
    }
    for s in [
        "a b", "u@h", ":80", "[::1]x", "[::1]:a", "exa%zz", "h:80:80", "h/x", "h#", "[::1",
    ] {
        assert!(!is_host_value(s.as_bytes()), "{}", s);
    }
}

#[test]
fn http_version_rule() {
    assert_eq!(parse_http_version(b"HTTP/1.1"), Ok((1, 1)));
    assert_eq!(parse_http_version(b"HTTP/1.0"), Ok((1, 0)));
    for v in ["HTTP/2.0", "HTTP/0.9", "HTTP/1.2", "HTTP/9.9"] {
        assert_eq!(
            parse_http_version(v.as_bytes()),
            Err(Reject::Status(505)),
            "{}",
            v
        );
    }
    for v in [
        "http/1.1",
        "HTTP/1.10",
        "HTTP/1",
        "HTTP/1.1 ",
        "HTTP/11",
        "HTTP/a.b",
        "",
        "HTTPS/1.1",
    ] {
        assert_eq!(
            parse_http_version(v.as_bytes()),
            Err(Reject::Status(400)),
            "{}",
            v
        );
    }
}

#[test]
fn content_length_rule() {
    assert_eq!(parse_content_length(b"0"), Ok(0));
    assert_eq!(parse_content_length(b"0005"), Ok(5));
    assert_eq!(parse_content_length(b"18446744073709551615"), Ok(u64::MAX));
    for v in [
        "18446744073709551616",
        "",
        "+5",
        "-5",
        "5,5",
        "5 5",
        "0x5",
        "5a",
    ] {
        assert_eq!(
            parse_content_length(v.as_bytes()),
            Err(Reject::Status(400)),
            "{}",
            v
        );
    }
}

#[test]
fn transfer_coding_classification() {
    use TeKind::*;
    for (v, k) in [
        ("chunked", Chunked),
        ("CHUNKED", Chunked),
        ("ChUnKeD", Chunked),
        ("gzip, chunked", Unsupported),
        ("gzip,chunked", Unsupported),
        ("gzip , deflate ,\tchunked", Unsupported),
        ("gzip;q=1, chunked", Unsupported),
        ("gzip ; a = \"x,y\", chunked", Unsupported),
        ("identity, chunked", Unsupported),
        ("chunked, chunked", Invalid),
        ("chunked, gzip", Invalid),
        ("identity", Invalid),
        ("gzip", Invalid),
        ("xchunked", Invalid),
        ("", Invalid),
        ("chunked;x", Invalid),
        ("chunked;a=b", Invalid),
        ("gzip, chunked;a=b", Invalid),
        ("\"chunked\"", Invalid),
        ("chunked,", Invalid),
        (", chunked", Invalid),
        ("gzip, , chunked", Invalid),
        ("gzip chunked", Invalid),
        ("gzip;q, chunked", Invalid),
    ] {
        assert_eq!(classify_transfer_encoding(v.as_bytes()), k, "{:?}", v);
    }
}

#[test]
fn chunk_size_line_rule() {
    assert_eq!(parse_chunk_size_line(b"0"), Ok(0));
    assert_eq!(parse_chunk_size_line(b"000"), Ok(0));
    assert_eq!(parse_chunk_size_line(b"a"), Ok(10));
    assert_eq!(parse_chunk_size_line(b"A"), Ok(10));
    assert_eq!(parse_chunk_size_line(b"ffffffffffffffff"), Ok(u64::MAX));
    assert_eq!(parse_chunk_size_line(b"00000000000000000005"), Ok(5)); // 20 digits
    assert_eq!(parse_chunk_size_line(b"0000ffffffffffffffff"), Ok(u64::MAX)); // 20 digits
    assert_eq!(
        parse_chunk_size_line(b"10000000000000000"),
        Err(Reject::Status(400))
    ); // 17 significant
    assert_eq!(parse_chunk_size_line(b"5;a"), Ok(5));
    assert_eq!(parse_chunk_size_line(b"5;a=b"), Ok(5));
    assert_eq!(parse_chunk_size_line(b"5 ;a"), Ok(5));
    assert_eq!(parse_chunk_size_line(b"5 ; a = b ;c;d=\"q\""), Ok(5));
    assert_eq!(parse_chunk_size_line(b"5;a=\"x y\""), Ok(5));
    assert_eq!(parse_chunk_size_line(b"5;a=\"x\\\"y;z\""), Ok(5));
    for l in [
        "", "5 ", "5\t", "5;", "5;a=", "5;a b", "5;a ", "5;a=b ", "5;=b", "x", "-5", "0x5", " 5",
        "5;a=\"x", "5,a",
    ] {
        assert_eq!(
            parse_chunk_size_line(l.as_bytes()),
            Err(Reject::Status(400)),
            "{:?}",
            l
        );
    }
}

#[test]
fn path_and_query_matchers() {
    assert_eq!(match_absolute_path(b"/a/b?c", 0), Some(4));
    assert_eq!(match_absolute_path(b"a/b", 0), None);
    assert_eq!(match_path_abempty(b"", 0), 0);
    assert_eq!(match_path_abempty(b"x", 0), 0);
    assert_eq!(match_path_abempty(b"/a//b#", 0), 5);
    assert_eq!(match_segment(b"a%41b/c", 0), 5);
    assert_eq!(match_segment(b"a%4", 0), 1);
    assert_eq!(match_query(b"a/?b?#", 0), 5);
    assert_eq!(match_query(b"a b", 0), 1);
}

#[test]
fn split_host_port_and_authority_form() {
    assert_eq!(
        split_host_port(b"h:80"),
        Some((&b"h"[..], Some(&b"80"[..])))
    );
    assert_eq!(split_host_port(b"h"), Some((&b"h"[..], None)));
    assert_eq!(split_host_port(b"h:"), Some((&b"h"[..], Some(&b""[..]))));
    assert_eq!(
        split_host_port(b"[::1]:1"),
        Some((&b"[::1]"[..], Some(&b"1"[..])))
    );
    assert_eq!(split_host_port(b""), None);
    assert!(is_authority_form(b"h:1"));
    assert!(is_authority_form(b"h:65535"));
    assert!(is_authority_form(b"1.2.3.4:0443"));
    assert!(!is_authority_form(b"h:65536"));
    assert!(!is_authority_form(b"h:000001")); // Sluice: at most five digits
    assert!(!is_authority_form(b"h:99999999999999999999"));
    assert!(!is_authority_form(b"h:"));
    assert!(!is_authority_form(b"h"));
    assert!(!is_authority_form(b"[::1]"));
}

#[test]
fn field_line_direct() {
    assert_eq!(parse_field_line(b"A: b"), Ok(field("A", "b")));
    assert_eq!(parse_field_line(b"A:b"), Ok(field("A", "b")));
    assert_eq!(parse_field_line(b"A:\t b \t"), Ok(field("A", "b")));
    assert_eq!(parse_field_line(b"A::"), Ok(field("A", ":")));
    assert_eq!(parse_field_line(b"A"), Err(Reject::Status(400)));
    assert_eq!(parse_field_line(b" A: b"), Err(Reject::Status(400)));
    assert_eq!(parse_field_line(b"A : b"), Err(Reject::Status(400)));
    assert_eq!(parse_field_line(b"A: b\x7f"), Err(Reject::Status(400)));
}

#[test]
fn request_line_direct_order() {
    let rl = parse_request_line(b"GET /x HTTP/1.1").unwrap();
    assert_eq!(
        (
            rl.method.as_slice(),
            rl.target.as_slice(),
            rl.version,
            rl.form
        ),
        (&b"GET"[..], &b"/x"[..], (1, 1), TargetForm::Origin)
    );
    // version is checked before the target
    assert_eq!(
        parse_request_line(b"GET /# HTTP/2.0"),
        Err(Reject::Status(505))
    );
    assert_eq!(
        parse_request_line(b"GET /# HTTP/1.1"),
        Err(Reject::Status(400))
    );
    // method before everything
    assert_eq!(
        parse_request_line(b"G@T /x HTTP/2.0"),
        Err(Reject::Status(400))
    );
    // empty target
    assert_eq!(
        parse_request_line(b"GET  HTTP/1.1"),
        Err(Reject::Status(400))
    );
}

#[test]
fn chunk_ext_and_transfer_parameter_matchers() {
    assert_eq!(match_chunk_ext(b"", 0), Some(0));
    assert_eq!(match_chunk_ext(b" ", 0), Some(0));
    assert_eq!(match_chunk_ext(b";a;b=c", 0), Some(6));
    assert_eq!(match_chunk_ext(b"\t;\ta\t=\t\"\"", 0), Some(9));
    assert_eq!(match_chunk_ext(b";", 0), None);
    assert_eq!(match_chunk_ext(b";a=", 0), None);
    assert_eq!(match_transfer_parameter(b"q=1", 0), Some(3));
    assert_eq!(match_transfer_parameter(b"q = \"x\"", 0), Some(7));
    assert_eq!(match_transfer_parameter(b"q", 0), None);
    assert_eq!(match_transfer_parameter(b"=1", 0), None);
}

// ---- request line -------------------------------------------------------

#[test]
fn simple_get() {
    let input = b"GET /a?b HTTP/1.1\r\nHost: example.com\r\nX-A:  v w \t\r\n\r\nBODY";
    let r = ok(input);
    assert_eq!(r.method, b"GET");
    assert_eq!(r.target, b"/a?b");
    assert_eq!(r.version, (1, 1));
    assert_eq!(
        r.fields,
        vec![field("Host", "example.com"), field("X-A", "v w")]
    );
    assert_eq!(r.framing, Framing::None);
    assert_eq!(r.authority, b"example.com");
    assert_eq!(r.origin_path, b"/a?b");
    assert_eq!(r.head_len, input.len() - 4);
}

#[test]
fn leading_empty_lines_skipped_and_counted() {
    let r = ok(b"\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n");
    assert_eq!(r.head_len, 4 + 16 + 9 + 2);
    assert_eq!(st(b"\nGET / HTTP/1.1\r\nHost: h\r\n\r\n"), S400);
    assert_eq!(st(b"\r\rGET / HTTP/1.1\r\nHost: h\r\n\r\n"), S400);
    assert_eq!(st(b" \r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n"), S400);
}

#[test]
fn request_line_spacing() {
    assert_eq!(st(b"GET  / HTTP/1.1\r\nHost: h\r\n\r\n"), S400);
    assert_eq!(st(b"GET /  HTTP/1.1\r\nHost: h\r\n\r\n"), S400);
    assert_eq!(st(b"GET / HTTP/1.1 \r\nHost: h\r\n\r\n"), S400);
    assert_eq!(st(b" GET / HTTP/1.1\r\nHost: h\r\n\r\n"), S400);
    assert_eq!(st(b"GET\t/ HTTP/1.1\r\nHost: h\r\n\r\n"), S400);
    assert_eq!(st(b"GET /\r\n\r\n"), S400); // HTTP/0.9 style
    assert_eq!(st(b"GET\r\n\r\n"), S400);
}

#[test]
fn method_is_token() {
    assert_eq!(ok(b"get / HTTP/1.1\r\nHost: h\r\n\r\n").method, b"get");
    assert_eq!(ok(b"X-M~ / HTTP/1.1\r\nHost: h\r\n\r\n").method, b"X-M~");
    assert_eq!(st(b"G(T / HTTP/1.1\r\nHost: h\r\n\r\n"), S400);
    assert_eq!(st(b"G\x80T / HTTP/1.1\r\nHost: h\r\n\r\n"), S400);
}

#[test]
fn versions() {
    assert_eq!(ok(b"GET / HTTP/1.0\r\n\r\n").version, (1, 0));
    assert_eq!(
        rej(b"GET / HTTP/2.0\r\nHost: h\r\n\r\n"),
        Reject::Status(505)
    );
    assert_eq!(
        rej(b"GET / HTTP/1.2\r\nHost: h\r\n\r\n"),
        Reject::Status(505)
    );
    assert_eq!(st(b"GET / http/1.1\r\nHost: h\r\n\r\n"), S400);
    assert_eq!(st(b"GET / HTTP/1.1.1\r\nHost: h\r\n\r\n"), S400);
}

#[test]
fn request_line_errors_precede_field_errors() {
    assert_eq!(
        rej(b"GET / HTTP/2.0\r\nBad Line\r\n\r\n"),
        Reject::Status(505)
    );
    assert_eq!(rej(b"GET / HTTP/2.0\r\nX: a\n"), Reject::Status(505));
    // ...but the version is only known once the request line is complete
    assert_eq!(rej(b"GET / HTTP/2.0"), Reject::Incomplete);
}

#[test]
fn ipv4_and_reg_name_hosts() {
    assert_eq!(
        ok(b"GET / HTTP/1.1\r\nHost: 10.0.0.1:8080\r\n\r\n").authority,
        b"10.0.0.1:8080"
    );
    assert_eq!(
        ok(b"GET / HTTP/1.1\r\nHost: 999.1.1.1\r\n\r\n").authority,
        b"999.1.1.1"
    );
    assert_eq!(
        ok(b"GET / HTTP/1.1\r\nHost: a-b_c~d.%41\r\n\r\n").authority,
        b"a-b_c~d.%41"
    );
    assert_eq!(st(b"GET / HTTP/1.1\r\nHost: \xc3\xa9.com\r\n\r\n"), S400);
}

// ---- line endings -------------------------------------------------------

#[test]
fn bare_lf_anywhere() {
    assert_eq!(st(b"GET / HTTP/1.1\nHost: h\r\n\r\n"), S400);
    assert_eq!(st(b"GET / HTTP/1.1\r\nHost: h\n\r\n"), S400);
    assert_eq!(st(b"GET / HTTP/1.1\r\nHost: h\r\n\n"), S400);
    assert_eq!(st(b"GET /a\nb HTTP/1.1\r\nHost: h\r\n\r\n"), S400);
    assert_eq!(st(b"GET / HTTP/1.1\r\nX: a\nb\r\nHost: h\r\n\r\n"), S400);
    // Detected before the head is complete.
    assert_eq!(st(b"GET / HTTP/1.1\r\nX: a\n"), S400);
}

#[test]
fn bare_cr_anywhere() {
    assert_eq!(st(b"GET / HTTP/1.1\rHost: h\r\n\r\n"), S400);
    assert_eq!(st(b"GET / HTTP/1.1\r\nX: a\rb\r\nHost: h\r\n\r\n"), S400);
    assert_eq!(st(b"GET / HTTP/1.1\r\nHost: h\r\n\r\r\n"), S400);
    assert_eq!(
        st(b"GET / HTTP/1.1\r\nHost: h\r\n\r"),
        Err(Reject::Incomplete)
    );
}

// ---- field lines --------------------------------------------------------

#[test]
fn obs_fold_rejected() {
    assert_eq!(st(&get_with("X: a\r\n b\r\n")), S400);
    assert_eq!(st(&get_with("X: a\r\n\tb\r\n")), S400);
    // whitespace before the first field line
    assert_eq!(st(b"GET / HTTP/1.1\r\n Host: h\r\n\r\n"), S400);
}

#[test]
fn whitespace_before_colon() {
    assert_eq!(st(b"GET / HTTP/1.1\r\nHost : h\r\n\r\n"), S400);
    assert_eq!(st(b"GET / HTTP/1.1\r\nHost\t: h\r\n\r\n"), S400);
    assert_eq!(st(&get_with("X-A : v\r\n")), S400);
}

#[test]
fn field_line_syntax() {
    assert_eq!(st(&get_with("NoColon\r\n")), S400);
    assert_eq!(st(&get_with(": v\r\n")), S400);
    assert_eq!(st(&get_with("X\"Y: v\r\n")), S400);
    assert_eq!(st(&get_with("X: a\0b\r\n")), S400);
    assert_eq!(st(&get_with("X: a\x7fb\r\n")), S400);
    assert_eq!(st(&get_with("X: a\x01\r\n")), S400);
    let r = ok(&get_with("X:\r\nY: \t \r\nZ:a:b\r\n"));
    assert_eq!(
        &r.fields[1..],
        &[field("X", ""), field("Y", ""), field("Z", "a:b")]
    );
    let r = ok(b"GET / HTTP/1.1\r\nHost: h\r\nX: \xff\x80 q\r\n\r\n");
    assert_eq!(r.fields[1].1, b"\xff\x80 q");
}

// ---- Host ---------------------------------------------------------------

#[test]
fn duplicate_host_case_insensitive() {
    assert_eq!(st(b"GET / HTTP/1.1\r\nHost: h\r\nhost: h\r\n\r\n"), S400);
    assert_eq!(st(b"GET / HTTP/1.1\r\nHOST: a\r\nHost: b\r\n\r\n"), S400);
    assert_eq!(st(b"GET / HTTP/1.0\r\nHost: a\r\nhOsT: a\r\n\r\n"), S400);
}

#[test]
fn missing_host() {
    assert_eq!(st(b"GET / HTTP/1.1\r\nX: y\r\n\r\n"), S400);
    let r = ok(b"GET / HTTP/1.0\r\n\r\n");
    assert_eq!(r.authority, b"");
    assert_eq!(ok(b"GET / HTTP/1.0\r\nHost: a:1\r\n\r\n").authority, b"a:1");
}

#[test]
fn host_values() {
    assert_eq!(st(b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n"), S400);
    assert_eq!(st(b"GET / HTTP/1.1\r\nHost: u@h\r\n\r\n"), S400);
    assert_eq!(st(b"GET / HTTP/1.1\r\nHost: h:x\r\n\r\n"), S400);
    assert_eq!(
        ok(b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n").authority,
        b"[::1]:8080"
    );
    // Empty Host: allowed with origin-form / asterisk-form.
    assert_eq!(ok(b"GET / HTTP/1.1\r\nHost:\r\n\r\n").authority, b"");
    assert_eq!(ok(b"OPTIONS * HTTP/1.1\r\nHost: \r\n\r\n").authority, b"");
    // ...and when the target carries an authority (which is used instead).
    assert_eq!(
        ok(b"GET http://a/ HTTP/1.1\r\nHost:\r\n\r\n").authority,
        b"a"
    );
    assert_eq!(
        ok(b"CONNECT a:443 HTTP/1.1\r\nHost:\r\n\r\n").authority,
        b"a:443"
    );
}

// ---- Content-Length / Transfer-Encoding ---------------------------------

#[test]
fn content_length_framing() {
    assert_eq!(
        ok(&get_with("Content-Length: 5\r\n")).framing,
        Framing::Length(5)
    );
    assert_eq!(
        ok(&get_with("content-length:  007 \r\n")).framing,
        Framing::Length(7)
    );
    assert_eq!(
        st(&get_with("Content-Length: 5\r\nContent-Length: 5\r\n")),
        S400
    );
    assert_eq!(
        st(&get_with("Content-Length: 5\r\ncontent-length: 6\r\n")),
        S400
    );
    assert_eq!(st(&get_with("Content-Length: 5, 5\r\n")), S400);
    assert_eq!(st(&get_with("Content-Length: 5,5\r\n")), S400);
    assert_eq!(st(&get_with("Content-Length: +5\r\n")), S400);
    assert_eq!(st(&get_with("Content-Length:\r\n")), S400);
    assert_eq!(
        st(&get_with("Content-Length: 18446744073709551616\r\n")),
        S400
    );
}

#[test]
fn cl_and_te_together() {
    assert_eq!(
        st(&get_with(
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n"
        )),
        S400
    );
    assert_eq!(
        st(&get_with(
            "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n"
        )),
        S400
    );
    // even when the TE would be 501 on its own
    assert_eq!(
        st(&get_with(
            "Transfer-Encoding: gzip, chunked\r\nContent-Length: 5\r\n"
        )),
        S400
    );
}

#[test]
fn te_variants() {
    for v in ["chunked", "Chunked", "CHUNKED", "  chunked\t"] {
        assert_eq!(
            ok(&get_with(&format!("Transfer-Encoding:{}\r\n", v))).framing,
            Framing::Chunked,
            "{:?}",
            v
        );
    }
    for v in ["gzip, chunked", "deflate,chunked", "x;a=\"b\" , chunked"] {
        assert_eq!(
            rej(&get_with(&format!("Transfer-Encoding: {}\r\n", v))),
            Reject::Status(501),
            "{:?}",
            v
        );
    }
    for v in [
        "chunked, chunked",
        "chunked, gzip",
        "identity",
        "xchunked",
        "",
        "chunked;x",
        "\"chunked\"",
        "chunked,",
        "gzip",
    ] {
        assert_eq!(
            st(&get_with(&format!("Transfer-Encoding: {}\r\n", v))),
            S400,
            "{:?}",
            v
        );
    }
}

#[test]
fn te_field_count_and_version() {
    assert_eq!(
        st(&get_with(
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n"
        )),
        S400
    );
    assert_eq!(
        st(&get_with(
            "Transfer-Encoding: gzip\r\ntransfer-encoding: chunked\r\n"
        )),
        S400
    );
    assert_eq!(
        st(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
        S400
    );
    assert_eq!(
        st(b"POST / HTTP/1.0\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
        S400
    );
}

#[test]
fn te_501_only_when_otherwise_valid() {
    // a later malformed line wins over the 501
    assert_eq!(
        st(&get_with(
            "Transfer-Encoding: gzip, chunked\r\nBad Line\r\n"
        )),
        S400
    );
    // missing Host wins over the 501
    assert_eq!(
        st(b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
        S400
    );
}

// ---- request-target forms -----------------------------------------------

#[test]
fn absolute_form_authority_wins() {
    let r = ok(b"GET http://example.com:8080/p?q HTTP/1.1\r\nHost: other.org\r\n\r\n");
    assert_eq!(r.authority, b"example.com:8080");
    assert_eq!(r.origin_path, b"/p?q");
    assert_eq!(r.target, b"http://example.com:8080/p?q");
    assert_eq!(r.fields, vec![field("Host", "other.org")]);
}

#[test]
fn absolute_form_paths() {
    assert_eq!(ok(&line("http://a")).origin_path, b"/");
    assert_eq!(ok(&line("http://a?x=1")).origin_path, b"/?x=1");
    assert_eq!(ok(&line("HTTPS://A.b/")).origin_path, b"/");
    assert_eq!(ok(&line("HtTp://a//x/")).origin_path, b"//x/");
    assert_eq!(ok(&line("http://[::1]:80/x")).authority, b"[::1]:80");
    assert_eq!(ok(b"GET http://a/x HTTP/1.0\r\n\r\n").authority, b"a");
}

#[test]
fn absolute_form_rejects() {
    for t in [
        "http://user@a/",
        "http://user:pw@a/",
        "http://@a/",
        "http:///x",
        "http://:80/",
        "http://a/#f",
        "http://a#f",
        "ftp://a/",
        "http:/a",
        "http:a",
        "httpx://a/",
        "http://a b/",
        "http://a/%zz",
        "http://a:x/",
    ] {
        assert_eq!(st(&line(t)), S400, "{}", t);
    }
}

#[test]
fn userinfo_rejected() {
    assert_eq!(st(&line("http://u@h/")), S400);
    assert_eq!(st(b"CONNECT u@h:443 HTTP/1.1\r\nHost: h\r\n\r\n"), S400);
}

#[test]
fn asterisk_only_with_options() {
    let r = ok(b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n");
    assert_eq!(r.origin_path, b"*");
    assert_eq!(r.authority, b"h");
    assert_eq!(st(b"GET * HTTP/1.1\r\nHost: h\r\n\r\n"), S400);
    assert_eq!(st(b"options * HTTP/1.1\r\nHost: h\r\n\r\n"), S400);
    assert_eq!(st(b"OPTIONS *x HTTP/1.1\r\nHost: h\r\n\r\n"), S400);
    assert_eq!(
        ok(b"OPTIONS /x HTTP/1.1\r\nHost: h\r\n\r\n").origin_path,
        b"/x"
    );
}

#[test]
fn connect_authority_form() {
    let r = ok(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n");
    assert_eq!(r.authority, b"example.com:443");
    assert_eq!(r.origin_path, b"example.com:443");
    assert_eq!(
        ok(b"CONNECT [::1]:443 HTTP/1.1\r\nHost: x\r\n\r\n").authority,
        b"[::1]:443"
    );
    for t in [
        "example.com",
        "example.com:",
        "example.com:65536",
        "/",
        "http://a:1/",
        ":443",
        "a:443/",
    ] {
        let req = format!("CONNECT {} HTTP/1.1\r\nHost: h\r\n\r\n", t);
        assert_eq!(st(req.as_bytes()), S400, "{}", t);
    }
    // authority-form only with CONNECT
    assert_eq!(st(b"GET example.com:443 HTTP/1.1\r\nHost: h\r\n\r\n"), S400);
}

#[test]
fn target_bytes() {
    assert_eq!(st(b"GET /\xc3\xa9 HTTP/1.1\r\nHost: h\r\n\r\n"), S400);
    assert_eq!(st(&line("/a#b")), S400);
    assert_eq!(st(&line("/%zz")), S400);
    assert_eq!(st(&line("/%4")), S400);
    assert_eq!(st(&line("/a\"b")), S400);
    assert_eq!(st(&line("/a{b}")), S400);
    assert_eq!(st(&line("a")), S400);
    assert_eq!(st(b"GET /\x00 HTTP/1.1\r\nHost: h\r\n\r\n"), S400);
    assert_eq!(st(b"GET /\x7f HTTP/1.1\r\nHost: h\r\n\r\n"), S400);
    assert_eq!(
        ok(&line("/%41%2f?x=/?&y=%7E")).origin_path,
        b"/%41%2f?x=/?&y=%7E"
    );
}

// ---- limits -------------------------------------------------------------

#[test]
fn target_limit_414() {
    let t8192 = format!("/{}", "a".repeat(MAX_TARGET - 1));
    assert_eq!(ok(&line(&t8192)).target.len(), MAX_TARGET);
    let t8193 = format!("/{}", "a".repeat(MAX_TARGET));
    assert_eq!(rej(&line(&t8193)), Reject::Status(414));
    // known before the line is complete
    let partial = format!("GET {}", t8193);
    assert_eq!(rej(partial.as_bytes()), Reject::Status(414));
    let partial = format!("GET {}", t8192);
    assert_eq!(rej(partial.as_bytes()), Reject::Incomplete);
    // an invalid method is an earlier error
    let partial = format!("G(T {}", t8193);
    assert_eq!(rej(partial.as_bytes()), Reject::Incomplete);
    assert_eq!(
        rej(format!("G(T {} HTTP/1.1\r\n", t8193).as_bytes()),
        Reject::Status(400)
    );
    // 414 wins over a bad version and bad target bytes
    assert_eq!(
        rej(format!("GET /{} HTTP/9\r\n", "#".repeat(MAX_TARGET)).as_bytes()),
        Reject::Status(414)
    );
}

#[test]
fn head_limit_431() {
    // A head of exactly 65536 bytes, padded with several X fields (one
    // field line may not exceed 16384 bytes).
    let mut head = String::from("GET / HTTP/1.1\r\nHost: h\r\n");
    while head.len() + 2 < MAX_HEAD {
        let room = MAX_HEAD - 2 - head.len(); // bytes left for field lines
        let n = room.min(10000);
        if n < 6 {
            break;
        }
        head.push_str(&format!("X: {}\r\n", "a".repeat(n - 5)));
    }
    head.push_str("\r\n");
    assert_eq!(head.len(), MAX_HEAD);
    assert_eq!(ok(head.as_bytes()).head_len, MAX_HEAD);
    // one more byte in a field value -> 431
    let over = head.replacen("X: a", "X: aa", 1);
    assert_eq!(rej(over.as_bytes()), Reject::Status(431));
    // incomplete head already at the limit -> 431, not Incomplete
    let partial = &over.as_bytes()[..MAX_HEAD];
    assert_eq!(rej(partial), Reject::Status(431));
    assert_eq!(rej(&over.as_bytes()[..MAX_HEAD - 1]), Reject::Incomplete);
    // leading empty lines count toward the limit
    let leading = format!("\r\n{}", head);
    assert_eq!(rej(leading.as_bytes()), Reject::Status(431));
    assert_eq!(rej(&b"\r\n".repeat(MAX_HEAD / 2 + 1)), Reject::Status(431));
}

#[test]
fn field_count_431() {
    let mut ok100 = String::from("GET / HTTP/1.1\r\nHost: h\r\n");
    for i in 0..99 {
        ok100.push_str(&format!("X-{}: v\r\n", i));
    }
    assert_eq!(ok(format!("{}\r\n", ok100).as_bytes()).fields.len(), 100);
    let over = format!("{}X-last: v\r\n\r\n", ok100);
    assert_eq!(rej(over.as_bytes()), Reject::Status(431));
    // the count wins over the syntax of the 101st line
    let over = format!("{}Bad Line\r\n\r\n", ok100);
    assert_eq!(rej(over.as_bytes()), Reject::Status(431));
    // an earlier error wins over the count
    let early = ok100.replacen("X-0: v", "X-0 : v", 1) + "X-last: v\r\n\r\n";
    assert_eq!(rej(early.as_bytes()), Reject::Status(400));
}

#[test]
fn field_line_limit_431() {
    let v16384 = "a".repeat(MAX_FIELD_LINE - 3); // "X: " + value = 16384
    assert_eq!(ok(&get_with(&format!("X: {}\r\n", v16384))).fields.len(), 2);
    let v16385 = "a".repeat(MAX_FIELD_LINE - 2);
    assert_eq!(
        rej(&get_with(&format!("X: {}\r\n", v16385))),
        Reject::Status(431)
    );
    // known before the line ends
    let partial = format!("GET / HTTP/1.1\r\nX: {}", v16385);
    assert_eq!(rej(partial.as_bytes()), Reject::Status(431));
    let partial = format!("GET / HTTP/1.1\r\nX: {}", v16384);
    assert_eq!(rej(partial.as_bytes()), Reject::Incomplete);
    // NUL early in the line: the line is still too long first
    let partial = format!("GET / HTTP/1.1\r\nX: \0{}", v16385);
    assert_eq!(rej(partial.as_bytes()), Reject::Status(431));
}

#[test]
fn incomplete_heads() {
    for s in [
        "",
        "\r\n",
        "GET",
        "GET / HTTP/1.1",
        "GET / HTTP/1.1\r",
        "GET / HTTP/1.1\r\nHost: h",
        "GET / HTTP/1.1\r\nHost: h\r\n",
        "GET / HTTP/1.1\r\nHost: h\r\n\r",
        "GET / HTTP/1.1\r\nX: \0",
    ] {
        assert_eq!(rej(s.as_bytes()), Reject::Incomplete, "{:?}", s);
    }
}

#[test]
fn prefix_stability() {
    // Every status given for a prefix is the status of the whole input,
    // and Ok is only given for the whole head.
    let inputs: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\nHost: h\r\nX: a\nb\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n".to_vec(),
        b"\r\n\r\nPOST http://a/b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc".to_vec(),
        b"GET / HTTP/1.1\r\nHost: h\r\nHost: h\r\n\r\n".to_vec(),
        b"GET / HTTP/2.0\r\nHost: h\r\n\r\n".to_vec(),
    ];
    for input in inputs {
        let full = parse_head(&input);
        for k in 0..=input.len() {
            match parse_head(&input[..k]) {
                Err(Reject::Incomplete) => {}
                Err(e) => assert_eq!(Err(e), full.clone().map(|_| ()), "prefix {}", k),
                Ok(r) => assert_eq!(Ok(r), full.clone(), "prefix {}", k),
            }
        }
    }
}

// ---- chunked ------------------------------------------------------------

#[test]
fn chunked_basic_with_trailers() {
    let input = b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-T: a \r\ny:\r\n\r\nNEXT";
    let (data, trailers, used) = decode_chunked(input).unwrap();
    assert_eq!(data, b"hello world");
    assert_eq!(trailers, vec![field("X-T", "a"), field("y", "")]);
    assert_eq!(used, input.len() - 4);
    let (chunks, _, _) = decode_chunked_parts(input).unwrap();
    assert_eq!(chunks, vec![b"hello".to_vec(), b" world".to_vec()]);
}

#[test]
fn chunked_empty_and_last_chunk_zeros() {
    assert_eq!(decode_chunked(b"0\r\n\r\n"), Ok((vec![], vec![], 5)));
    assert_eq!(decode_chunked(b"000\r\n\r\n"), Ok((vec![], vec![], 7)));
    assert_eq!(decode_chunked(b"0;ext=1\r\n\r\n"), Ok((vec![], vec![], 11)));
}

#[test]
fn chunked_extension_quoted_string() {
    let input = b"3;name=\"quoted ; \\\" value\";x\r\nabc\r\n0 ; done\r\n\r\n";
    let (data, _, used) = decode_chunked(input).unwrap();
    assert_eq!(data, b"abc");
    assert_eq!(used, input.len());
    assert_eq!(
        decode_chunked(b"3;n=\"unterminated\r\nabc\r\n0\r\n\r\n"),
        Err(Reject::Status(400))
    );
}

#[test]
fn chunked_leading_zeros_and_overflow() {
    let input = b"00000000000000000003\r\nabc\r\n0\r\n\r\n"; // 20 digits
    assert_eq!(decode_chunked(input).unwrap().0, b"abc");
    assert_eq!(
        decode_chunked(b"10000000000000000\r\n"),
        Err(Reject::Status(400))
    );
    assert_eq!(
        decode_chunked(b"fffffffffffffffff\r\n"),
        Err(Reject::Status(400))
    );
    // 16 significant digits fit: the data is just not there yet
    assert_eq!(
        decode_chunked(b"ffffffffffffffff\r\nabc"),
        Err(Reject::Incomplete)
    );
}

#[test]
fn chunked_size_line_whitespace_and_empty() {
    assert_eq!(
        decode_chunked(b"5 \r\nhello\r\n0\r\n\r\n"),
        Err(Reject::Status(400))
    );
    assert_eq!(
        decode_chunked(b"5\t\r\nhello\r\n0\r\n\r\n"),
        Err(Reject::Status(400))
    );
    assert_eq!(decode_chunked(b"0 \r\n\r\n"), Err(Reject::Status(400)));
    assert_eq!(
        decode_chunked(b"5 ;a\r\nhello\r\n0\r\n\r\n").unwrap().0,
        b"hello"
    );
    assert_eq!(
        decode_chunked(b"\r\n5\r\nhello\r\n0\r\n\r\n"),
        Err(Reject::Status(400))
    );
    assert_eq!(decode_chunked(b"x\r\n"), Err(Reject::Status(400)));
}

#[test]
fn chunked_bare_lf_cr_and_data_crlf() {
    assert_eq!(
        decode_chunked(b"5\nhello\r\n0\r\n\r\n"),
        Err(Reject::Status(400))
    );
    assert_eq!(
        decode_chunked(b"5\rhello\r\n0\r\n\r\n"),
        Err(Reject::Status(400))
    );
    assert_eq!(
        decode_chunked(b"5\r\nhello\n0\r\n\r\n"),
        Err(Reject::Status(400))
    );
    assert_eq!(
        decode_chunked(b"5\r\nhelloX\r\n0\r\n\r\n"),
        Err(Reject::Status(400))
    );
    assert_eq!(
        decode_chunked(b"5\r\nhello\rX0\r\n\r\n"),
        Err(Reject::Status(400))
    );
    assert_eq!(decode_chunked(b"0\r\n\n"), Err(Reject::Status(400)));
    assert_eq!(decode_chunked(b"0\r\nX: a\n\r\n"), Err(Reject::Status(400)));
    assert_eq!(
        decode_chunked(b"0\r\nX: a\r\n\r\r\n"),
        Err(Reject::Status(400))
    );
    // CR/LF inside chunk-data are data
    assert_eq!(
        decode_chunked(b"2\r\n\r\n\r\n0\r\n\r\n").unwrap().0,
        b"\r\n"
    );
}

#[test]
fn chunked_incomplete() {
    for s in [
        "",
        "5",
        "5\r",
        "5\r\nhel",
        "5\r\nhello",
        "5\r\nhello\r",
        "5\r\nhello\r\n",
        "0\r\n",
        "0\r\n\r",
        "0\r\nX: a\r\n",
        "0\r\nX: a",
    ] {
        assert_eq!(
            decode_chunked(s.as_bytes()),
            Err(Reject::Incomplete),
            "{:?}",
            s
        );
    }
}

#[test]
fn chunked_size_line_limit() {
    let ok_line = format!(
        "5;{}\r\nhello\r\n0\r\n\r\n",
        "a".repeat(MAX_CHUNK_SIZE_LINE - 2)
    );
    assert_eq!(decode_chunked(ok_line.as_bytes()).unwrap().0, b"hello");
    let long = format!(
        "5;{}\r\nhello\r\n0\r\n\r\n",
        "a".repeat(MAX_CHUNK_SIZE_LINE - 1)
    );
    assert_eq!(decode_chunked(long.as_bytes()), Err(Reject::Status(400)));
    let partial = format!("5;{}", "a".repeat(MAX_CHUNK_SIZE_LINE - 1));
    assert_eq!(decode_chunked(partial.as_bytes()), Err(Reject::Status(400)));
}

#[test]
fn trailer_syntax_and_limit() {
    assert_eq!(
        decode_chunked(b"0\r\nX : a\r\n\r\n"),
        Err(Reject::Status(400))
    );
    assert_eq!(
        decode_chunked(b"0\r\nX: a\r\n b\r\n\r\n"),
        Err(Reject::Status(400))
    );
    assert_eq!(
        decode_chunked(b"0\r\nNoColon\r\n\r\n"),
        Err(Reject::Status(400))
    );
    assert_eq!(
        decode_chunked(b"0\r\nX: a\0\r\n\r\n"),
        Err(Reject::Status(400))
    );
    // exactly 16384 bytes of trailer-section (line incl. CRLF)
    let t = format!("X: {}\r\n", "a".repeat(MAX_TRAILER_SECTION - 5));
    assert_eq!(t.len(), MAX_TRAILER_SECTION);
    let input = format!("0\r\n{}\r\n", t);
    assert_eq!(decode_chunked(input.as_bytes()).unwrap().2, input.len());
    let t = format!("X: {}\r\n", "a".repeat(MAX_TRAILER_SECTION - 4));
    let input = format!("0\r\n{}\r\n", t);
    assert_eq!(decode_chunked(input.as_bytes()), Err(Reject::Status(400)));
}

// ---- streams ------------------------------------------------------------

#[test]
fn pipelined_gets() {
    let input = b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n";
    let (reqs, rej) = parse_stream(input);
    assert_eq!(rej, None);
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].0.target, b"/a");
    assert_eq!(reqs[1].0.target, b"/b");
}

#[test]
fn pipelined_bodies() {
    let input = b"POST /1 HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc\
POST /2 HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nde\r\n0\r\nT: v\r\n\r\n\
\r\nGET /3 HTTP/1.0\r\n\r\n\
GET /4 HTTP/1.1\r\nHost: h\r\n\r\n";
    let (reqs, rej) = parse_stream(input);
    assert_eq!(rej, None);
    let got: Vec<(&[u8], &[u8])> = reqs
        .iter()
        .map(|(r, b)| (r.target.as_slice(), b.as_slice()))
        .collect();
    assert_eq!(
        got,
        vec![
            (&b"/1"[..], &b"abc"[..]),
            (b"/2", b"de"),
            (b"/3", b""),
            (b"/4", b"")
        ]
    );
    let (msgs, _) = parse_stream_messages(input);
    assert_eq!(msgs[1].trailers, vec![field("T", "v")]);
    assert!(!is_persistent(&msgs[2].request));
    assert!(is_persistent(&msgs[3].request));
}

#[test]
fn stream_stops_at_rejection_and_incomplete() {
    let input = b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\n\r\nGET /c HTTP/1.1\r\nHost: h\r\n\r\n";
    let (reqs, rej) = parse_stream(input);
    assert_eq!(reqs.len(), 1);
    assert_eq!(rej, Some(Reject::Status(400)));
    let (reqs, rej) = parse_stream(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTT");
    assert_eq!((reqs.len(), rej), (1, Some(Reject::Incomplete)));
    let (reqs, rej) = parse_stream(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nabc");
    assert_eq!((reqs.len(), rej), (0, Some(Reject::Incomplete)));
    let (reqs, rej) = parse_stream(
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\n",
    );
    assert_eq!((reqs.len(), rej), (0, Some(Reject::Status(400))));
    assert_eq!(parse_stream(b""), (vec![], None));
    // a trailing CRLF is the start of an incomplete next request
    let (reqs, rej) = parse_stream(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n\r\n");
    assert_eq!((reqs.len(), rej), (1, Some(Reject::Incomplete)));
}

// ---- canonical ------------------------------------------------------------

#[test]
fn canonical_origin_form() {
    let r = ok(b"\r\nGET /x HTTP/1.0\r\nHost:  h \r\nA:\tb  c\t\r\n\r\n");
    assert_eq!(
        canonical(&r, b"", &[]),
        b"GET /x HTTP/1.0\r\nHost: h\r\nA: b  c\r\n\r\n".to_vec()
    );
}

#[test]
fn canonical_absolute_form_host_replaced() {
    let r = ok(b"GET http://a:1?q HTTP/1.1\r\nX: 1\r\nhost: other\r\nY: 2\r\n\r\n");
    assert_eq!(
        canonical(&r, b"", &[]),
        b"GET /?q HTTP/1.1\r\nX: 1\r\nHost: a:1\r\nY: 2\r\n\r\n".to_vec()
    );
    let r = ok(b"GET HTTP://A/p HTTP/1.0\r\nX: 1\r\n\r\n");
    assert_eq!(
        canonical(&r, b"", &[]),
        b"GET /p HTTP/1.0\r\nHost: A\r\nX: 1\r\n\r\n".to_vec()
    );
}

#[test]
fn canonical_connect_and_options() {
    let r = ok(b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n");
    assert_eq!(
        canonical(&r, b"", &[]),
        b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n".to_vec()
    );
    let r = ok(b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n");
    assert_eq!(
        canonical(&r, b"", &[]),
        b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n".to_vec()
    );
}

#[test]
fn canonical_bodies() {
    let input = b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: Chunked\r\n\r\n\
001A;x=y\r\nabcdefghijklmnopqrstuvwxyz\r\n2\r\n!!\r\n00\r\nT1:  v \r\n\r\n";
    let (msgs, rej) = parse_stream_messages(input);
    assert_eq!(rej, None);
    let m = &msgs[0];
    assert_eq!(
        canonical(&m.request, &m.body, &m.trailers),
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: Chunked\r\n\r\n\
1c\r\nabcdefghijklmnopqrstuvwxyz!!\r\n0\r\nT1: v\r\n\r\n"
            .to_vec()
    );
    assert_eq!(
        canonical_with_chunks(&m.request, &m.chunks, &m.trailers),
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: Chunked\r\n\r\n\
1a\r\nabcdefghijklmnopqrstuvwxyz\r\n2\r\n!!\r\n0\r\nT1: v\r\n\r\n"
            .to_vec()
    );
    let r = ok(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n");
    assert_eq!(
        canonical(&r, b"", &[]),
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec()
    );
    let r = ok(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\n");
    assert_eq!(
        canonical(&r, b"a\r\n", &[]),
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\na\r\n".to_vec()
    );
}

#[test]
fn canonical_ignores_body_without_framing() {
    let r = ok(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n");
    assert_eq!(
        canonical(&r, b"junk", &[]),
        b"GET / HTTP/1.1\r\nHost: h\r\n\r\n".to_vec()
    );
}

#[test]
fn canonical_is_a_fixpoint() {
    let input = b"\r\nPOST http://a.example:8/x?y HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\nZ:  z \r\n\r\n\
3;e\r\nabc\r\n0\r\nT: 1\r\n\r\nGET /q HTTP/1.1\r\nHost: c\r\nContent-Length: 2\r\n\r\nxy";
    let (once, rej) = canonical_stream(input);
    assert_eq!(rej, None);
    let (twice, rej) = canonical_stream(&once);
    assert_eq!(rej, None);
    assert_eq!(once, twice);
}

#[test]
fn never_panics_on_small_inputs() {
    // Exhaustive over a tiny alphabet, all strings up to length 5, after a valid prefix.
    let alphabet = [b'\r', b'\n', b' ', b':', b'0', b';', b'"', b'a'];
    let prefixes: [&[u8]; 3] = [
        b"",
        b"GET / HTTP/1.1\r\nHost: h\r\n",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n",
    ];
    for p in prefixes {
        let mut buf: Vec<usize> = Vec::new();
        loop {
            let mut s = p.to_vec();
            s.extend(buf.iter().map(|&i| alphabet[i]));
            let _ = parse_head(&s);
            let _ = decode_chunked(&s);
            let _ = parse_stream(&s);
            // next combination
            let mut k = 0;
            loop {
                if k == buf.len() {
                    buf.push(0);
                    break;
                }
                buf[k] += 1;
                if buf[k] < alphabet.len() {
                    break;
                }
                buf[k] = 0;
                k += 1;
            }
            if buf.len() > 5 {
                break;
            }
        }
    }
}
