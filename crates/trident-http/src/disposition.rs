//! `Content-Disposition: attachment` for a file name that may hold anything a client chose:
//! quotes, backslashes, control characters, newlines, non-ASCII.

/// The header value: `attachment; filename="<ASCII stand-in>"`, and, when the name is not
/// plain printable ASCII, `filename*=UTF-8''<percent-encoded>` after it (RFC 6266 §4.3 with
/// RFC 5987), as Rails' `ContentDisposition` writes it. Always a valid header value.
pub fn attachment(name: &str) -> String {
    let plain = name.chars().all(|c| (' '..='~').contains(&c));
    // Go's net/http, which the reference Poseidon runs on, turns CR and LF into spaces;
    // every other character that cannot stand in a quoted string becomes `_`.
    let fallback: String = name
        .chars()
        .map(|c| match c {
            '\r' | '\n' => ' ',
            '"' | '\\' => '_',
            c if (' '..='~').contains(&c) => c,
            _ => '_',
        })
        .collect();
    if plain && !name.contains(['"', '\\']) {
        return format!("attachment; filename=\"{fallback}\"");
    }
    format!(
        "attachment; filename=\"{fallback}\"; filename*=UTF-8''{}",
        percent_encode(name)
    )
}

/// The last component of a path a client sent (`../../x` → `x`), or `fallback` when nothing
/// usable is left: what a download may call itself.
pub fn base_name<'a>(name: &'a str, fallback: &'a str) -> &'a str {
    let base = name.rsplit(['/', '\\']).next().unwrap_or_default();
    match base {
        "" | "." | ".." => fallback,
        base => base,
    }
}

/// RFC 5987 `attr-char`s stay, every other byte is `%XX`.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_stay_as_they_are() {
        assert_eq!(attachment("test.txt"), "attachment; filename=\"test.txt\"");
        assert_eq!(
            attachment("dir/a b.txt"),
            "attachment; filename=\"dir/a b.txt\""
        );
    }

    #[test]
    fn anything_else_gets_a_safe_stand_in_and_the_exact_name_encoded() {
        assert_eq!(
            attachment("a\"b\\c"),
            "attachment; filename=\"a_b_c\"; filename*=UTF-8''a%22b%5Cc"
        );
        assert_eq!(
            attachment("line\nbreak"),
            "attachment; filename=\"line break\"; filename*=UTF-8''line%0Abreak"
        );
        assert_eq!(
            attachment("grüße.zip"),
            "attachment; filename=\"gr__e.zip\"; filename*=UTF-8''gr%C3%BC%C3%9Fe.zip"
        );
        for name in ["x\r\ny", "\u{7f}", "tab\there", "\u{0}"] {
            let value = attachment(name);
            assert!(
                value.bytes().all(|b| (b' '..=b'~').contains(&b)),
                "{value:?} is not a valid header value"
            );
        }
    }

    #[test]
    fn base_names_drop_every_directory() {
        assert_eq!(base_name("../../../../tmp/x", "a.zip"), "x");
        assert_eq!(base_name("C:\\evil\\y.zip", "a.zip"), "y.zip");
        assert_eq!(base_name("..", "a.zip"), "a.zip");
        assert_eq!(base_name("dir/", "a.zip"), "a.zip");
        assert_eq!(base_name("artifacts.zip", "a.zip"), "artifacts.zip");
    }
}
