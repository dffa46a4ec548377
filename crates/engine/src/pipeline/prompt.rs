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

/// How prompt weights act on the text encoder's states (`--emphasis`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Emphasis {
    /// A1111's "Original": the states scaled token by token, then the chunk's mean restored.
    #[default]
    A1111,
    /// A1111's "No norm": scaled, the mean left as it falls.
    A1111NoNorm,
    /// ComfyUI's: each weighted state moved from the empty prompt's state, `e + (z − e)·w`.
    ComfyUi,
    /// Brackets and BREAK are plain text (diffusers reads prompts so).
    None,
}

impl Emphasis {
    pub const ALL: [Emphasis; 4] = [Emphasis::A1111, Emphasis::A1111NoNorm, Emphasis::ComfyUi, Emphasis::None];

    pub fn id(&self) -> &'static str {
        match self {
            Emphasis::A1111 => "a1111",
            Emphasis::A1111NoNorm => "a1111-no-norm",
            Emphasis::ComfyUi => "comfyui",
            Emphasis::None => "none",
        }
    }

    /// How A1111's PNGs name it (`Emphasis: No norm`); `None` for its default, which it omits.
    pub fn a1111_name(&self) -> Option<&'static str> {
        match self {
            Emphasis::A1111 => None,
            Emphasis::A1111NoNorm => Some("No norm"),
            Emphasis::ComfyUi => Some("ComfyUI"),
            Emphasis::None => Some("None"),
        }
    }

    pub fn label(&self) -> &'static str {
        match self {
            Emphasis::A1111 => "A1111 (Original)",
            Emphasis::A1111NoNorm => "A1111, no norm",
            Emphasis::ComfyUi => "ComfyUI",
            Emphasis::None => "None (brackets are text)",
        }
    }
}

impl std::fmt::Display for Emphasis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.id())
    }
}

impl std::str::FromStr for Emphasis {
    type Err = crate::Error;

    fn from_str(s: &str) -> crate::Result<Self> {
        let s = s.trim();
        Self::ALL
            .into_iter()
            .find(|e| e.id().eq_ignore_ascii_case(s) || e.a1111_name().is_some_and(|n| n.eq_ignore_ascii_case(s)))
            .or_else(|| s.eq_ignore_ascii_case("original").then_some(Emphasis::A1111))
            .ok_or_else(|| {
                crate::Error::InvalidSetting(format!(
                    "unknown emphasis {s:?}; expected a1111, a1111-no-norm, comfyui or none"
                ))
            })
    }
}

/// Prompt tokens per chunk (CLIP's 77 minus BOS and EOS).
pub const CHUNK_TOKENS: usize = 75;
/// How far back A1111 looks for a comma to end a full chunk at (`comma_padding_backtrack`).
const COMMA_BACKTRACK: usize = 20;

/// One 77-token window of a prompt: BOS, up to 75 tokens, EOS, padding; a weight per token.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptChunk {
    pub tokens: Vec<u32>,
    pub weights: Vec<f64>,
    /// Textual-inversion embeddings: (position in the 77, which embedding); their vectors
    /// replace the token embeddings from there (A1111's `PromptChunkFix`).
    pub fixes: Vec<(usize, usize)>,
}

/// A textual-inversion embedding as the prompt sees it: the tokens of its name, and how many
/// vectors (tokens) it puts in their place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddingName {
    pub ids: Vec<u32>,
    pub vectors: usize,
}

/// The embedding whose name's tokens start at `ids[at]`, longest name first (A1111's
/// `find_embedding_at_position`).
fn embedding_at(embeddings: &[EmbeddingName], ids: &[u32], at: usize) -> Option<usize> {
    embeddings
        .iter()
        .enumerate()
        .filter(|(_, e)| !e.ids.is_empty() && ids[at..].starts_with(&e.ids))
        .max_by_key(|(_, e)| e.ids.len())
        .map(|(i, _)| i)
}

/// The ids a tokenizer gives a piece of text, without BOS/EOS.
pub trait PieceTokenizer {
    fn tokenize(&self, text: &str) -> crate::Result<Vec<u32>>;
    fn bos(&self) -> u32;
    fn eos(&self) -> u32;
    fn pad(&self) -> u32;
    fn comma(&self) -> u32;
}

/// A prompt as A1111 splits it (`tokenize_line`): each piece tokenized alone, tokens gathered
/// into chunks of 75; a chunk that fills up while a comma sits in its last 20 tokens ends after
/// that comma (the rest moves on); BREAK ends a chunk. Each chunk gets BOS and EOS and is
/// padded to 77 with EOS, then everything after the first EOS becomes the pad token (A1111's
/// `process_tokens`; SD 1.x pads with EOS anyway). Also returns the prompt's token count, as
/// A1111 counts it for "92/150".
pub fn chunk_prompt(
    tokenizer: &dyn PieceTokenizer,
    prompt: &str,
    emphasis: Emphasis,
) -> crate::Result<(Vec<PromptChunk>, usize)> {
    chunk_prompt_with(tokenizer, prompt, emphasis, &[])
}

/// [`chunk_prompt`] with textual-inversion embeddings: where a piece's tokens spell an
/// embedding's name, its vectors take their place (placeholder id 0, the piece's weight); an
/// embedding that does not fit in the chunk starts the next one.
pub fn chunk_prompt_with(
    tokenizer: &dyn PieceTokenizer,
    prompt: &str,
    emphasis: Emphasis,
    embeddings: &[EmbeddingName],
) -> crate::Result<(Vec<PromptChunk>, usize)> {
    let pieces = match emphasis {
        Emphasis::None => vec![PromptPiece::Text(prompt.to_string(), 1.0)],
        _ => parse_prompt_attention(prompt),
    };
    let (bos, eos, pad, comma) = (tokenizer.bos(), tokenizer.eos(), tokenizer.pad(), tokenizer.comma());
    let mut chunks = Vec::new();
    let (mut tokens, mut weights): (Vec<u32>, Vec<f64>) = (Vec::new(), Vec::new());
    let mut token_count = 0;
    let mut last_comma: Option<usize> = None;
    let mut fixes: Vec<(usize, usize)> = Vec::new();
    let mut next_chunk = |tokens: &mut Vec<u32>,
                          weights: &mut Vec<f64>,
                          fixes: &mut Vec<(usize, usize)>,
                          is_last: bool,
                          count: &mut usize| {
        *count += if is_last { tokens.len() } else { CHUNK_TOKENS };
        let mut ids = Vec::with_capacity(CHUNK_TOKENS + 2);
        ids.push(bos);
        ids.append(tokens);
        ids.resize(CHUNK_TOKENS + 1, eos);
        ids.push(eos);
        let first_eos = ids.iter().skip(1).position(|&t| t == eos).map_or(ids.len(), |p| p + 1);
        for id in &mut ids[first_eos + 1..] {
            *id = pad;
        }
        let mut w = Vec::with_capacity(CHUNK_TOKENS + 2);
        w.push(1.0);
        w.append(weights);
        w.resize(CHUNK_TOKENS + 2, 1.0);
        let fixes = fixes.drain(..).map(|(at, e)| (at + 1, e)).collect();
        chunks.push(PromptChunk { tokens: ids, weights: w, fixes });
    };
    for piece in pieces {
        let (text, weight) = match piece {
            PromptPiece::Break => {
                next_chunk(&mut tokens, &mut weights, &mut fixes, false, &mut token_count);
                last_comma = None;
                continue;
            }
            PromptPiece::Text(text, weight) => (text, weight),
        };
        let ids = tokenizer.tokenize(&text)?;
        let mut position = 0;
        while position < ids.len() {
            let token = ids[position];
            if token == comma {
                last_comma = Some(tokens.len());
            } else if let Some(at) =
                last_comma.filter(|&at| tokens.len() == CHUNK_TOKENS && tokens.len() - at <= COMMA_BACKTRACK)
            {
                let moved_tokens = tokens.split_off(at + 1);
                let moved_weights = weights.split_off(at + 1);
                // Embeddings in the moved part move with it (A1111 loses them here).
                let (moved_fixes, kept): (Vec<_>, Vec<_>) = fixes.iter().partition(|(p, _)| *p > at);
                fixes = kept;
                next_chunk(&mut tokens, &mut weights, &mut fixes, false, &mut token_count);
                last_comma = None;
                tokens = moved_tokens;
                weights = moved_weights;
                fixes = moved_fixes.into_iter().map(|(p, e)| (p - (at + 1), e)).collect();
            }
            if tokens.len() == CHUNK_TOKENS {
                next_chunk(&mut tokens, &mut weights, &mut fixes, false, &mut token_count);
                last_comma = None;
            }
            if let Some(e) = embedding_at(embeddings, &ids, position) {
                let vectors = embeddings[e].vectors.min(CHUNK_TOKENS);
                if tokens.len() + vectors > CHUNK_TOKENS {
                    next_chunk(&mut tokens, &mut weights, &mut fixes, false, &mut token_count);
                    last_comma = None;
                }
                fixes.push((tokens.len(), e));
                tokens.extend(std::iter::repeat_n(0, vectors));
                weights.extend(std::iter::repeat_n(weight, vectors));
                position += embeddings[e].ids.len();
                continue;
            }
            tokens.push(token);
            weights.push(weight);
            position += 1;
        }
    }
    if !tokens.is_empty() || token_count == 0 {
        next_chunk(&mut tokens, &mut weights, &mut fixes, true, &mut token_count);
    }
    Ok((chunks, token_count))
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

    /// Words as single tokens: "w<n>" is n, "," is 1000; BOS 1, EOS 2, pad 0.
    struct Words;

    impl PieceTokenizer for Words {
        fn tokenize(&self, text: &str) -> crate::Result<Vec<u32>> {
            Ok(text
                .replace(',', " , ")
                .split_whitespace()
                .map(|w| if w == "," { 1000 } else { w.trim_start_matches('w').parse().unwrap_or(999) })
                .collect())
        }
        fn bos(&self) -> u32 {
            1
        }
        fn eos(&self) -> u32 {
            2
        }
        fn pad(&self) -> u32 {
            0
        }
        fn comma(&self) -> u32 {
            1000
        }
    }

    fn words(range: std::ops::Range<usize>) -> String {
        range.map(|i| format!("w{i}")).collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn a_short_prompt_is_one_chunk_padded_after_its_eos() {
        let (chunks, count) = chunk_prompt(&Words, "w10 (w11:1.5) w12", Emphasis::A1111).unwrap();
        assert_eq!((chunks.len(), count), (1, 3));
        let c = &chunks[0];
        assert_eq!(c.tokens.len(), 77);
        assert_eq!(&c.tokens[..6], &[1, 10, 11, 12, 2, 0]);
        assert_eq!(c.tokens[76], 0, "padding after the first EOS");
        assert_eq!(&c.weights[..5], &[1.0, 1.0, 1.5, 1.0, 1.0]);
        // No emphasis: the brackets stay (here as unknown words).
        let (plain, _) = chunk_prompt(&Words, "w10 (w11:1.5)", Emphasis::None).unwrap();
        assert!(plain[0].weights.iter().all(|&w| w == 1.0));
    }

    #[test]
    fn long_prompts_break_after_a_late_comma_and_at_break() {
        // 70 words, a comma, then 10 more: the chunk fills at 75 with the comma 4 back, so the
        // 4 words after the comma move to the next chunk.
        let prompt = format!("{}, {}", words(100..170), words(200..210));
        let (chunks, count) = chunk_prompt(&Words, &prompt, Emphasis::A1111).unwrap();
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[0].tokens[71], 1000, "the comma ends the first chunk");
        assert_eq!(&chunks[0].tokens[72..74], &[2, 0], "then EOS and padding");
        assert_eq!(&chunks[1].tokens[..3], &[1, 200, 201]);
        assert_eq!(count, 75 + 10);
        // A comma further back than 20 tokens does not move anything.
        let prompt = format!("{}, {}", words(100..140), words(200..250));
        let (chunks, _) = chunk_prompt(&Words, &prompt, Emphasis::A1111).unwrap();
        assert_eq!((chunks[0].tokens[75], chunks[1].tokens[1]), (233, 234));
        // BREAK: a new chunk, the first padded.
        let (chunks, count) = chunk_prompt(&Words, "w5 BREAK w6", Emphasis::A1111).unwrap();
        assert_eq!(chunks.len(), 2);
        assert_eq!((&chunks[0].tokens[..3], &chunks[1].tokens[..3]), (&[1, 5, 2][..], &[1, 6, 2][..]));
        assert_eq!(count, 76);
        assert_eq!(chunk_prompt(&Words, "", Emphasis::A1111).unwrap().0.len(), 1, "an empty prompt is one chunk");
    }

    #[test]
    fn emphasis_names_round_trip() {
        for e in Emphasis::ALL {
            assert_eq!(e.id().parse::<Emphasis>().unwrap(), e);
        }
        assert_eq!("No norm".parse::<Emphasis>().unwrap(), Emphasis::A1111NoNorm);
        assert_eq!("Original".parse::<Emphasis>().unwrap(), Emphasis::A1111);
        assert!("loud".parse::<Emphasis>().is_err());
    }

    #[test]
    fn an_embedding_takes_its_vectors_place_and_moves_to_the_next_chunk_when_it_does_not_fit() {
        let emb = [EmbeddingName { ids: vec![77, 78], vectors: 3 }];
        let (chunks, count) = chunk_prompt_with(&Words, "w5 w77 w78 w6", Emphasis::A1111, &emb).unwrap();
        assert_eq!(&chunks[0].tokens[..7], &[1, 5, 0, 0, 0, 6, 2]);
        assert_eq!((chunks[0].fixes.clone(), count), (vec![(2, 0)], 5));
        // 74 words, then the 3-vector embedding: it starts the second chunk.
        let prompt = format!("{} w77 w78", words(100..174));
        let (chunks, _) = chunk_prompt_with(&Words, &prompt, Emphasis::A1111, &emb).unwrap();
        assert_eq!(chunks.len(), 2);
        assert!(chunks[0].fixes.is_empty());
        assert_eq!(chunks[1].fixes, vec![(1, 0)]);
        assert_eq!(&chunks[1].tokens[..5], &[1, 0, 0, 0, 2]);
    }
}
