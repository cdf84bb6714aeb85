//! CLIP's text tokenizer as diffusers pipelines ship it, giving the ids of
//! transformers' `CLIPTokenizerFast` (equal to the slow `CLIPTokenizer`
//! without ftfy on ordinary prompts; see [`ClipTokenizer`] for where the two
//! differ), built from the `tokenizers` crate's pipeline pieces:
//!
//! - normalizer: NFC, every whitespace run to one space, lower-case;
//! - pre-tokenizer: CLIP's split regex (whitespace dropped, which also strips
//!   the prompt), then the byte-level alphabet (GPT-2's byte-to-unicode map);
//! - model: BPE with the end-of-word suffix `</w>`;
//! - post-processor: `<|startoftext|>` ... `<|endoftext|>`, truncated to keep
//!   both and padded to `model_max_length` with the folder's pad token.
//!
//! Like transformers, every special token the folder names (bos, eos, unk,
//! pad) is an added special token: it is split out of the prompt before BPE.
//! That matters when the pad token is an ordinary vocabulary entry, as SD 2.x's
//! `!` (id 0): there "ArtStation!!!" ends in three separate `!` ids, where
//! SD 1.x (pad `<|endoftext|>`) gives the merged `!!!</w>` token.

use crate::error::{file_err, Error, Result};
use crate::io::config::read_json;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::{replace::ReplacePattern, Lowercase, Replace, Sequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{
    AddedToken, PaddingParams, PaddingStrategy, SplitDelimiterBehavior, Tokenizer, TruncationParams,
};

/// CLIP's pre-tokenization pattern (transformers' `CLIPConverter`; the slow
/// tokenizer's regex without its special-token alternatives, which the added
/// vocabulary handles).
const CLIP_SPLIT: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// transformers' slow `CLIPTokenizer` reads at most this many merges
/// (49152 - 256 - 2) from `merges.txt`, after skipping its first line.
const CLIP_MAX_MERGES: usize = 49152 - 256 - 2;

/// `model_max_length` when the config does not give one (CLIP's 77 positions).
const DEFAULT_MAX_LENGTH: usize = 77;

/// Bound on `model_max_length`, against absurd configs (each prompt is padded to it).
const MAX_MAX_LENGTH: usize = 1 << 16;

/// transformers writes `int(1e30)` as `model_max_length` for "no limit".
const NO_LIMIT_SENTINEL: f64 = 1e29;

/// CLIP's tokenizer for one diffusers `tokenizer/` folder.
///
/// Known differences from transformers 4.x's slow `CLIPTokenizer` without
/// ftfy (diffusers' default class), which cleans text with BERT's
/// `BasicTokenizer` first: the slow one deletes control and format
/// characters (U+0000-U+001F except tab/newline/CR, U+200B, U+FFFD, ...),
/// puts spaces around CJK ideographs, and lower-cases a final capital sigma
/// to `ς`; this tokenizer, like `CLIPTokenizerFast`, keeps those characters,
/// keeps CJK runs together and lower-cases `Σ` to `σ` everywhere.
#[derive(Clone, Debug)]
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    dir: PathBuf,
    max_length: usize,
    pad_id: u32,
    bos_id: u32,
    eos_id: u32,
}

impl ClipTokenizer {
    /// A tokenizer folder as diffusers pipelines ship it: `tokenizer.json` if
    /// present, else `vocab.json` + `merges.txt`; `tokenizer_config.json` and
    /// `special_tokens_map.json` (both optional, the latter wins as in
    /// transformers) name the pad/bos/eos/unk tokens and `model_max_length`
    /// (default 77), and `added_tokens_decoder` adds tokens such as textual
    /// inversion embeddings at their ids.
    pub fn from_dir(dir: &Path) -> Result<ClipTokenizer> {
        let config = FolderConfig::read(dir)?;
        let [unk, bos, eos, pad] = &config.specials;
        let json_path = dir.join("tokenizer.json");
        let mut tokenizer = if crate::platform::is_file(&json_path) {
            let bytes = crate::platform::read(&json_path)
                .map_err(|e| file_err(&json_path, format!("cannot read: {e}")))?;
            Tokenizer::from_bytes(&bytes)
                .map_err(|e| file_err(&json_path, format!("not a valid tokenizer.json: {e}")))?
        } else {
            bpe_pipeline(dir, &unk.token.content)?
        };

        for (id, token) in &config.added {
            add_token(&mut tokenizer, token, &config.config_path)?;
            let got = tokenizer.token_to_id(&token.content);
            if got != Some(*id) {
                let got = got.map_or("no id".to_string(), |g| format!("id {g}"));
                return Err(config_err(
                    &config.config_path,
                    &format!("added_tokens_decoder.{id}"),
                    format!(
                        "token '{}' gets {got} with this vocabulary, not {id}",
                        token.content
                    ),
                ));
            }
        }
        let mut ids = [0u32; 4];
        for (s, id) in config.specials.iter().zip(&mut ids) {
            let content = &s.token.content;
            *id = tokenizer.token_to_id(content).ok_or_else(|| {
                let msg = format!("special token '{content}' is not in the vocabulary");
                config_err(&s.path, s.field, msg)
            })?;
            add_token(&mut tokenizer, &s.token, &s.path)?;
        }
        let [_, bos_id, eos_id, pad_id] = ids;

        if tokenizer.get_post_processor().is_none() {
            // transformers' CLIPConverter: <|startoftext|> $A <|endoftext|>.
            let processor = RobertaProcessing::new(
                (eos.token.content.clone(), eos_id),
                (bos.token.content.clone(), bos_id),
            )
            .trim_offsets(false)
            .add_prefix_space(false);
            tokenizer.with_post_processor(Some(processor));
        }
        // Truncation counts the post-processor's BOS/EOS, so they always survive.
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: config.max_length,
                ..Default::default()
            }))
            .map_err(|e| file_err(dir, format!("truncation: {e}")))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(config.max_length),
            pad_id,
            pad_token: pad.token.content.clone(),
            ..Default::default()
        }));

        Ok(ClipTokenizer {
            tokenizer,
            dir: dir.to_path_buf(),
            max_length: config.max_length,
            pad_id,
            bos_id,
            eos_id,
        })
    }

    /// Ids of one prompt, exactly `max_length` long: BOS, tokens, EOS, padded
    /// with the pad token; truncation keeps BOS and EOS.
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(prompt, true)
            .map_err(|e| file_err(&self.dir, format!("tokenizing {prompt:?}: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// [`encode`](Self::encode) for several prompts.
    pub fn encode_batch(&self, prompts: &[&str]) -> Result<Vec<Vec<u32>>> {
        let encodings = self
            .tokenizer
            .encode_batch(prompts.to_vec(), true)
            .map_err(|e| {
                file_err(
                    &self.dir,
                    format!("tokenizing a batch of {} prompts: {e}", prompts.len()),
                )
            })?;
        Ok(encodings.iter().map(|e| e.get_ids().to_vec()).collect())
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Number of ids, added tokens included (the text encoder's vocab_size).
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }
}

/// Add `token` to the added vocabulary unless it already is there (a
/// tokenizer.json lists its own, whose flags then stand, as in transformers).
fn add_token(tokenizer: &mut Tokenizer, token: &AddedToken, path: &Path) -> Result<()> {
    if !tokenizer
        .get_added_vocabulary()
        .get_vocab()
        .contains_key(&token.content)
    {
        tokenizer
            .add_tokens([token.clone()])
            .map_err(|e| file_err(path, format!("adding token '{}': {e}", token.content)))?;
    }
    Ok(())
}

/// The pipeline of transformers' `CLIPConverter` around the BPE model of
/// `vocab.json` + `merges.txt`.
fn bpe_pipeline(dir: &Path, unk: &str) -> Result<Tokenizer> {
    let vocab_path = dir.join("vocab.json");
    let text = crate::platform::read_to_string(&vocab_path).map_err(|e| {
        file_err(
            &vocab_path,
            format!(
                "cannot read: {e} (a tokenizer folder needs tokenizer.json, or vocab.json and \
                 merges.txt)"
            ),
        )
    })?;
    let vocab: Vocab = serde_json::from_str(&text).map_err(|e| {
        file_err(
            &vocab_path,
            format!("invalid vocabulary JSON (expected {{\"token\": id, ...}}): {e}"),
        )
    })?;
    let merges = read_merges(&dir.join("merges.txt"))?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .unk_token(unk.to_string())
        .end_of_word_suffix("</w>".to_string())
        .build()
        .map_err(|e| file_err(dir, format!("vocab.json and merges.txt do not fit: {e}")))?;

    let mut tokenizer = Tokenizer::new(bpe);
    let whitespace = Replace::new(ReplacePattern::Regex(r"\s+".into()), " ")
        .expect("constant whitespace regex compiles");
    tokenizer
        .with_normalizer(Some(Sequence::new(vec![
            NFC.into(),
            whitespace.into(),
            Lowercase.into(),
        ])))
        .map_err(|e| file_err(dir, format!("normalizer: {e}")))?;
    let split = Split::new(
        SplitPattern::Regex(CLIP_SPLIT.into()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .expect("constant CLIP split regex compiles");
    tokenizer.with_pre_tokenizer(Some(PreSequence::new(vec![
        split.into(),
        ByteLevel::new(false, true, true).into(),
    ])));
    Ok(tokenizer)
}

/// The merge pairs of `merges.txt`, read as transformers' slow tokenizer
/// does: the first line (`#version: ...`) skipped, at most
/// [`CLIP_MAX_MERGES`] pairs.
fn read_merges(path: &Path) -> Result<Merges> {
    let text = crate::platform::read_to_string(path)
        .map_err(|e| file_err(path, format!("cannot read: {e}")))?;
    text.trim()
        .split('\n')
        .enumerate()
        .skip(1)
        .take(CLIP_MAX_MERGES)
        .map(|(i, line)| {
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) => Ok((a.to_string(), b.to_string())),
                _ => Err(file_err(
                    path,
                    format!("line {}: expected two tokens, found {line:?}", i + 1),
                )),
            }
        })
        .collect()
}

/// The special tokens' fields, in the order of [`FolderConfig::specials`],
/// with `CLIPTokenizer`'s defaults.
const SPECIAL_FIELDS: [(&str, &str); 4] = [
    ("unk_token", "<|endoftext|>"),
    ("bos_token", "<|startoftext|>"),
    ("eos_token", "<|endoftext|>"),
    ("pad_token", "<|endoftext|>"),
];

/// A special token and where it was named (for errors).
struct Special {
    token: AddedToken,
    path: PathBuf,
    field: &'static str,
}

/// What `tokenizer_config.json` and `special_tokens_map.json` say.
struct FolderConfig {
    /// unk, bos, eos, pad.
    specials: [Special; 4],
    /// `added_tokens_decoder` by id, ascending (so new ids are assigned in order).
    added: Vec<(u32, AddedToken)>,
    max_length: usize,
    config_path: PathBuf,
}

impl FolderConfig {
    fn read(dir: &Path) -> Result<FolderConfig> {
        let config_path = dir.join("tokenizer_config.json");
        let map_path = dir.join("special_tokens_map.json");
        let config = read_optional_json(&config_path)?;
        let map = read_optional_json(&map_path)?;

        let special = |(field, default): (&'static str, &str)| -> Result<Special> {
            // special_tokens_map.json overrides tokenizer_config.json, as in
            // transformers' from_pretrained.
            for (path, json) in [(&map_path, &map), (&config_path, &config)] {
                if let Some(v) = json.get(field) {
                    return Ok(Special {
                        token: parse_token(v, path, field, field != "pad_token")?,
                        path: path.clone(),
                        field,
                    });
                }
            }
            Ok(Special {
                token: AddedToken::from(default, true).normalized(field != "pad_token"),
                path: dir.to_path_buf(),
                field,
            })
        };
        let [a, b, c, d] = SPECIAL_FIELDS;
        let specials = [special(a)?, special(b)?, special(c)?, special(d)?];

        let mut added = Vec::new();
        if let Some(decoder) = config.get("added_tokens_decoder") {
            let field = "added_tokens_decoder";
            let entries = decoder.as_object().ok_or_else(|| {
                config_err(&config_path, field, "expected an object {\"id\": token}")
            })?;
            for (id, v) in entries {
                let field = format!("{field}.{id}");
                let id = id
                    .parse::<u32>()
                    .map_err(|_| config_err(&config_path, &field, "the key is not a token id"))?;
                added.push((id, parse_token(v, &config_path, &field, true)?));
            }
        }
        added.sort_by_key(|&(id, _)| id);

        let max_length = match config.get("model_max_length") {
            None => DEFAULT_MAX_LENGTH,
            Some(v) => match (v.as_u64(), v.as_f64()) {
                (Some(n), _) if (2..=MAX_MAX_LENGTH as u64).contains(&n) => n as usize,
                (None, Some(x)) if x >= NO_LIMIT_SENTINEL => DEFAULT_MAX_LENGTH,
                _ => {
                    return Err(config_err(
                        &config_path,
                        "model_max_length",
                        format!("expected an integer in 2..={MAX_MAX_LENGTH}, found {v}"),
                    ))
                }
            },
        };

        Ok(FolderConfig {
            specials,
            added,
            max_length,
            config_path,
        })
    }
}

fn config_err(path: &Path, field: &str, msg: impl Into<String>) -> Error {
    Error::Config {
        path: path.display().to_string(),
        field: field.to_string(),
        msg: msg.into(),
    }
}

/// The JSON object of `path`, empty when the file does not exist.
fn read_optional_json(path: &Path) -> Result<Map<String, Value>> {
    if crate::platform::exists(path) {
        read_json(path)
    } else {
        Ok(Map::new())
    }
}

/// A token given as a string, or as an object with `content` and
/// transformers' `AddedToken` flags. `normalized` defaults as in
/// `CLIPTokenizer`: bos/eos/unk strings become normalized tokens, the pad
/// token does not.
fn parse_token(v: &Value, path: &Path, field: &str, normalized: bool) -> Result<AddedToken> {
    let token = AddedToken::from("", true).normalized(normalized);
    match v {
        Value::String(s) => Ok(AddedToken {
            content: s.clone(),
            ..token
        }),
        Value::Object(o) => {
            let flag = |name: &str, default: bool| match o.get(name) {
                None => Ok(default),
                Some(Value::Bool(b)) => Ok(*b),
                Some(other) => Err(config_err(
                    path,
                    &format!("{field}.{name}"),
                    format!("expected true or false, found {other}"),
                )),
            };
            let Some(Value::String(content)) = o.get("content") else {
                return Err(config_err(path, field, "expected a string 'content'"));
            };
            Ok(AddedToken {
                content: content.clone(),
                single_word: flag("single_word", false)?,
                lstrip: flag("lstrip", false)?,
                rstrip: flag("rstrip", false)?,
                normalized: flag("normalized", normalized)?,
                special: flag("special", true)?,
            })
        }
        _ => Err(config_err(
            path,
            field,
            format!("expected a token string or an object with 'content', found {v}"),
        )),
    }
}
