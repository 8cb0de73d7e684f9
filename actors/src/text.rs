//! Message text as channels limit it: how long one message may be on each
//! channel and how a longer reply is cut into parts. Pure; used by the
//! store (one outbox row per part) and by the sinks (a row written before
//! parts existed is still split when sent).

/// Longest message a channel takes, in UTF-16 units: Telegram's 4096;
/// Slack's recommended 4,000 (it cuts at 40,000 and answers
/// `msg_too_long` beyond); WhatsApp's 4096 characters of a text body.
/// `None`: the channel takes any length.
pub fn part_limit(channel: &str) -> Option<usize> {
    match channel {
        "telegram" | "whatsapp" => Some(4096),
        "slack" => Some(4000),
        _ => None,
    }
}

/// Split `text` into parts of at most `limit` UTF-16 units, at a line break
/// if one falls in the second half of the part, else at a space (second
/// half), else at a character boundary. The separator is dropped.
pub fn split_message(text: &str, limit: usize) -> Vec<String> {
    let limit = limit.max(2);
    let mut parts = Vec::new();
    let mut rest = text;
    loop {
        let mut units = 0;
        let mut max = rest.len();
        for (i, c) in rest.char_indices() {
            if units + c.len_utf16() > limit {
                max = i;
                break;
            }
            units += c.len_utf16();
        }
        if max == rest.len() {
            parts.push(rest.to_string());
            return parts;
        }
        let head = &rest[..max];
        let half = head.len() / 2;
        let at = |i: usize, sep: char| (i, i + sep.len_utf8());
        let (cut, next) = head
            .rfind('\n')
            .filter(|i| *i >= half)
            .map(|i| at(i, '\n'))
            .or_else(|| {
                head.char_indices()
                    .rev()
                    .find(|(i, c)| c.is_whitespace() && *i >= half)
                    .map(|(i, c)| at(i, c))
            })
            .unwrap_or((max, max));
        parts.push(rest[..cut].to_string());
        rest = &rest[next..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_per_channel() {
        assert_eq!(part_limit("telegram"), Some(4096));
        assert_eq!(part_limit("slack"), Some(4000));
        assert_eq!(part_limit("whatsapp"), Some(4096));
        assert_eq!(part_limit("webhook"), None);
        assert_eq!(split_message("", 10), vec![""]);
    }
}
