//! Keeping secrets out of text that leaves keel (logs, metric labels, error
//! fields). Errors are built without secrets in the first place; these are
//! the helpers for doing so and the second line of defence.

/// Replace every occurrence of `token` in `text`.
pub fn redact(text: &str, token: &str) -> String {
    if token.is_empty() {
        return text.to_string();
    }
    text.replace(token, "<redacted>")
}

/// reqwest errors include the URL, which may carry a token in its query.
pub fn without_url(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_body() || e.is_decode() {
        "bad response body"
    } else if e.is_request() {
        "request error"
    } else {
        "error"
    };
    let mut src: Option<&dyn std::error::Error> = std::error::Error::source(e);
    let mut detail = String::new();
    while let Some(s) = src {
        detail = s.to_string();
        src = s.source();
    }
    if detail.is_empty() {
        kind.to_string()
    } else {
        format!("{kind}: {detail}")
    }
}

/// Mask words that look like credentials (`xox…`/`xapp-…` Slack tokens,
/// `token=…`, `/bot…` Bot API paths, `123456:ABC…` Telegram tokens) with
/// `[redacted]`; whitespace is normalised to single spaces.
pub fn mask_secret_words(text: &str) -> String {
    mask_secret_words_keeping_space(text)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// [`mask_secret_words`] with the whitespace left as it is (log lines keep
/// their indentation).
pub fn mask_secret_words_keeping_space(text: &str) -> String {
    let looks_secret = |w: &str| {
        let w = w.trim_matches(|c: char| !c.is_ascii_alphanumeric());
        w.starts_with("xox")
            || w.starts_with("xapp-")
            || w.to_ascii_lowercase().contains("token=")
            || w.contains("/bot")
            || w.split_once(':').is_some_and(|(id, rest)| {
                !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) && rest.len() >= 20
            })
    };
    let mut out = String::with_capacity(text.len());
    let mut word: Option<usize> = None;
    let push = |out: &mut String, w: &str| {
        out.push_str(if looks_secret(w) { "[redacted]" } else { w });
    };
    for (i, c) in text.char_indices() {
        if c.is_whitespace() {
            if let Some(start) = word.take() {
                push(&mut out, &text[start..i]);
            }
            out.push(c);
        } else if word.is_none() {
            word = Some(i);
        }
    }
    if let Some(start) = word {
        push(&mut out, &text[start..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_masked_and_replaced() {
        assert_eq!(
            redact("GET /bot123:abc/x failed", "123:abc"),
            "GET /bot<redacted>/x failed"
        );
        assert_eq!(redact("nothing", ""), "nothing");
        let masked = mask_secret_words("auth xoxb-1-2 failed for 123456:ABCDEFGHIJKLMNOPQRSTUV ok");
        assert_eq!(masked, "auth [redacted] failed for [redacted] ok");
    }
}
