//! The prompt language artists write, with AUTOMATIC1111's semantics: `(x)` weighs x by 1.1,
//! `(x:w)` by w, `[x]` by 1/1.1, nesting multiplies, `\(` `\)` `\[` `\]` `\\` are literal,
//! an unclosed bracket applies to the rest, and `BREAK` starts a new 75-token chunk.
//!
//! Written by hand (no crate parses A1111's prompts), as a port of `parse_prompt_attention` in
//! A1111's `modules/prompt_parser.py`: the same tokens in the same order of alternatives, the
//! same f64 multiplications, the same merging of neighbours of equal weight.

/// One piece of a parsed prompt.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptPiece {
    /// Text and the weight its tokens get.
    Text(String, f64),
    /// `BREAK`: the text after it starts a new chunk.
    Break,
}

/// A1111's weight for `(x)`.
const ROUND: f64 = 1.1;
/// A1111's weight for `[x]`.
const SQUARE: f64 = 1.0 / 1.1;

enum Token<'a> {
    /// `\(`, `\)`, `\[`, `\]`, `\\` or a lone `\`: the text after the backslash.
    Literal(&'a str),
    OpenRound,
    OpenSquare,
    /// `:w)`, closing a round bracket with weight w.
    WeightClose(f64),
    CloseRound,
    CloseSquare,
    /// A run of ordinary characters, or a `:` that closes nothing (the matched length says which).
    Text,
}

/// `:\s*([+-]?[.\d]+)\s*\)` at the start of `s`: the weight and the length matched.
fn weight_close(s: &str) -> Option<(f64, usize)> {
    let rest = s.strip_prefix(':')?;
    let after_space = rest.trim_start();
    let number_len = after_space
        .char_indices()
        .take_while(|&(i, c)| c.is_ascii_digit() || c == '.' || (i == 0 && (c == '+' || c == '-')))
        .map(|(i, c)| i + c.len_utf8())
        .last()?;
    let number = &after_space[..number_len];
    if !number.chars().any(|c| c.is_ascii_digit() || c == '.') || number.ends_with(['+', '-']) {
        return None;
    }
    let tail = after_space[number_len..].trim_start();
    let tail = tail.strip_prefix(')')?;
    // A1111 calls float() on the match; what it cannot read (e.g. "1.2.3") stays text here.
    let weight: f64 = number.parse().ok()?;
    Some((weight, s.len() - tail.len()))
}

fn next_token(s: &str) -> (Token<'_>, usize) {
    let mut chars = s.chars();
    let first = chars.next().unwrap_or('\0');
    match first {
        '\\' => match chars.next() {
            Some(c @ ('(' | ')' | '[' | ']' | '\\')) => (Token::Literal(&s[1..1 + c.len_utf8()]), 2),
            _ => (Token::Literal(""), 1),
        },
        '(' => (Token::OpenRound, 1),
        '[' => (Token::OpenSquare, 1),
        ':' => match weight_close(s) {
            Some((weight, len)) => (Token::WeightClose(weight), len),
            None => (Token::Text, 1),
        },
        ')' => (Token::CloseRound, 1),
        ']' => (Token::CloseSquare, 1),
        _ => {
            let len = s.find(['\\', '(', ')', '[', ']', ':']).unwrap_or(s.len());
            (Token::Text, len)
        }
    }
}

/// Splits ordinary text at `BREAK` (a whole word, with the spaces around it), as A1111's
/// `re.split(r"\s*\bBREAK\b\s*", text)`.
fn split_breaks(text: &str) -> Vec<&str> {
    let word_char = |c: char| c.is_alphanumeric() || c == '_';
    let mut parts = Vec::new();
    let mut start = 0;
    let mut search = 0;
    while let Some(found) = text[search..].find("BREAK") {
        let at = search + found;
        let end = at + "BREAK".len();
        let before_ok = text[..at].chars().next_back().is_none_or(|c| !word_char(c));
        let after_ok = text[end..].chars().next().is_none_or(|c| !word_char(c));
        if before_ok && after_ok {
            let left = text[start..at].trim_end();
            parts.push(left);
            let rest = &text[end..];
            start = end + (rest.len() - rest.trim_start().len());
            search = start;
        } else {
            search = end;
        }
    }
    parts.push(&text[start..]);
    parts
}

/// A prompt in A1111's language as pieces of text with weights, and BREAKs.
pub fn parse_prompt_attention(text: &str) -> Vec<PromptPiece> {
    // (text, weight); a weight of -1 marks BREAK, as in A1111.
    let mut res: Vec<(String, f64)> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let multiply = |res: &mut Vec<(String, f64)>, from: usize, by: f64| {
        for piece in &mut res[from..] {
            piece.1 *= by;
        }
    };
    let mut rest = text;
    while !rest.is_empty() {
        let (token, len) = next_token(rest);
        match token {
            Token::Literal(t) => res.push((t.to_string(), 1.0)),
            Token::OpenRound => round.push(res.len()),
            Token::OpenSquare => square.push(res.len()),
            Token::WeightClose(w) if !round.is_empty() => {
                let from = round.pop().unwrap_or(0);
                multiply(&mut res, from, w);
            }
            Token::CloseRound if !round.is_empty() => {
                let from = round.pop().unwrap_or(0);
                multiply(&mut res, from, ROUND);
            }
            Token::CloseSquare if !square.is_empty() => {
                let from = square.pop().unwrap_or(0);
                multiply(&mut res, from, SQUARE);
            }
            // Anything else (also a closing bracket or `:w)` that closes nothing) is text.
            _ => {
                let matched = &rest[..len];
                for (i, part) in split_breaks(matched).into_iter().enumerate() {
                    if i > 0 {
                        res.push(("BREAK".into(), -1.0));
                    }
                    res.push((part.to_string(), 1.0));
                }
            }
        }
        rest = &rest[len..];
    }
    for from in round {
        multiply(&mut res, from, ROUND);
    }
    for from in square {
        multiply(&mut res, from, SQUARE);
    }
    if res.is_empty() {
        res.push((String::new(), 1.0));
    }
    // Neighbours of equal weight become one piece.
    let mut merged: Vec<(String, f64)> = Vec::with_capacity(res.len());
    for (text, weight) in res {
        match merged.last_mut() {
            Some(last) if last.1 == weight => last.0.push_str(&text),
            _ => merged.push((text, weight)),
        }
    }
    merged
        .into_iter()
        .map(
            |(text, weight)| {
                if weight == -1.0 && text == "BREAK" {
                    PromptPiece::Break
                } else {
                    PromptPiece::Text(text, weight)
                }
            },
        )
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> Vec<(String, f64)> {
        parse_prompt_attention(text)
            .into_iter()
            .map(|p| match p {
                PromptPiece::Text(t, w) => (t, w),
                PromptPiece::Break => ("BREAK".into(), -1.0),
            })
            .collect()
    }

    fn pieces(list: &[(&str, f64)]) -> Vec<(String, f64)> {
        list.iter().map(|(t, w)| (t.to_string(), *w)).collect()
    }

    /// The examples in A1111's docstring of `parse_prompt_attention`, weights to the bit.
    #[test]
    fn a1111s_own_examples() {
        assert_eq!(parsed("normal text"), pieces(&[("normal text", 1.0)]));
        assert_eq!(parsed("an (important) word"), pieces(&[("an ", 1.0), ("important", 1.1), (" word", 1.0)]));
        assert_eq!(parsed("(unbalanced"), pieces(&[("unbalanced", 1.1)]));
        assert_eq!(parsed("\\(literal\\]"), pieces(&[("(literal]", 1.0)]));
        assert_eq!(parsed("(unnecessary)(parens)"), pieces(&[("unnecessaryparens", 1.1)]));
        assert_eq!(
            parsed("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."),
            pieces(&[
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ])
        );
    }

    #[test]
    fn break_square_brackets_and_stray_colons() {
        assert_eq!(parsed("a cat BREAK a dog"), pieces(&[("a cat", 1.0), ("BREAK", -1.0), ("a dog", 1.0)]));
        // BREAK only as a whole word.
        assert_eq!(parsed("BREAKFAST"), pieces(&[("BREAKFAST", 1.0)]));
        assert_eq!(parsed("[faded]"), pieces(&[("faded", 1.0 / 1.1)]));
        assert_eq!(parsed("ratio 16:9"), pieces(&[("ratio 16:9", 1.0)]));
        assert_eq!(parsed("(fox: 0.8 )"), pieces(&[("fox", 0.8)]));
        assert_eq!(parsed("fox:1.2)"), pieces(&[("fox:1.2)", 1.0)]), "a weight closing nothing is text");
        assert_eq!(parsed(""), pieces(&[("", 1.0)]));
        assert_eq!(parsed("a \\\\ b"), pieces(&[("a \\ b", 1.0)]));
    }
}
