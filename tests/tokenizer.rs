//! ClipTokenizer against transformers: tests/fixtures/generate.py wrote the
//! ids of every prompt in tests/fixtures/prompts.txt with the slow
//! CLIPTokenizer (checked equal to CLIPTokenizerFast) for two folders with a
//! reduced real CLIP vocabulary: tokenizer/ (vocab.json + merges.txt, pad
//! `<|endoftext|>`, SD 1.x) and tokenizer_sd2/ (also tokenizer.json, pad `!`,
//! SD 2.x). The ids must be identical.

use difftrain::io::TensorFile;
use difftrain::models::ClipTokenizer;
use std::path::{Path, PathBuf};

fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

/// One prompt per line; an empty line is the empty prompt.
fn prompts() -> Vec<String> {
    let text = std::fs::read_to_string(fixture("prompts.txt")).unwrap();
    text.lines().map(str::to_string).collect()
}

/// The expected ids of `folder`: one row of 77 per prompt.
fn expected(folder: &str, n_prompts: usize) -> Vec<Vec<u32>> {
    let file = TensorFile::read(&fixture(folder).join("expected.safetensors")).unwrap();
    let ids = file
        .get_shaped("input_ids", &[Some(n_prompts), Some(77)])
        .unwrap();
    ids.values
        .chunks(77)
        .map(|row| row.iter().map(|&v| v as u32).collect())
        .collect()
}

/// A fresh empty folder under the system temp dir.
fn temp_dir(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("difftrain-tokenizer-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Copy `files` of fixture `folder` into a fresh temp folder.
fn copy_fixture(folder: &str, files: &[&str], name: &str) -> PathBuf {
    let dir = temp_dir(name);
    for f in files {
        std::fs::copy(fixture(folder).join(f), dir.join(f)).unwrap();
    }
    dir
}

const SLOW_FILES: [&str; 4] = [
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// Every prompt, one by one and as a batch, gives the fixture's ids.
fn check_folder(tok: &ClipTokenizer, folder: &str) {
    let prompts = prompts();
    let want = expected(folder, prompts.len());
    for (i, (p, w)) in prompts.iter().zip(&want).enumerate() {
        let got = tok.encode(p).unwrap();
        assert_eq!(&got, w, "{folder}, prompt {i} {p:?}");
    }
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    assert_eq!(tok.encode_batch(&refs).unwrap(), want, "{folder}, batch");
    println!("{folder}: {} prompts identical", prompts.len());
}

fn error_of(dir: &Path) -> String {
    ClipTokenizer::from_dir(dir).unwrap_err().to_string()
}

#[test]
fn prompts_fixture_layout() {
    let p = prompts();
    assert_eq!(p.len(), 14);
    assert_eq!(p[5], "", "line 6 is the empty prompt");
    assert!(p[3].starts_with("  lots") && p[3].contains('\t'));
}

#[test]
fn sd1_vocab_and_merges_matches_transformers() {
    let tok = ClipTokenizer::from_dir(&fixture("tokenizer")).unwrap();
    assert_eq!(
        (tok.max_length(), tok.bos_id(), tok.eos_id(), tok.pad_id()),
        (77, 2512, 2513, 2513)
    );
    assert_eq!(tok.vocab_size(), 2514);
    check_folder(&tok, "tokenizer");
    let mut want = vec![2512, 2513];
    want.resize(77, 2513);
    assert_eq!(tok.encode("").unwrap(), want);
    // Special tokens in the text are matched after lower-casing.
    let ids = tok.encode("cat!!! Cat <|ENDOFTEXT|>!").unwrap();
    assert_eq!(ids[..7], [2512, 2368, 995, 2368, 2513, 256, 2513]);
}

#[test]
fn sd2_tokenizer_json_matches_transformers() {
    let tok = ClipTokenizer::from_dir(&fixture("tokenizer_sd2")).unwrap();
    assert_eq!(
        (tok.max_length(), tok.bos_id(), tok.eos_id(), tok.pad_id()),
        (77, 2512, 2513, 0)
    );
    assert_eq!(tok.vocab_size(), 2514);
    check_folder(&tok, "tokenizer_sd2");
}

/// Rewrite the JSON object `file` of `dir` with `edit`.
fn edit_json(
    dir: &Path,
    file: &str,
    edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
) {
    let path = dir.join(file);
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(json.as_object_mut().unwrap());
    std::fs::write(&path, json.to_string()).unwrap();
}

/// The pad token `!` is an added special token, also when the folder has no
/// tokenizer.json: `!!!` is three `!` (id 0) in SD 2.x, one `!!!</w>` in SD 1.x.
/// Checked with the config as saved and without its `added_tokens_decoder`
/// (older transformers, e.g. the stable-diffusion-2 repository, do not
/// write it; the pad token alone must then make `!` special).
#[test]
fn sd2_vocab_and_merges_matches_transformers() {
    for strip_added in [false, true] {
        let dir = copy_fixture("tokenizer_sd2", &SLOW_FILES, "sd2-slow");
        if strip_added {
            edit_json(&dir, "tokenizer_config.json", |c| {
                c.remove("added_tokens_decoder").unwrap();
            });
        }
        let tok = ClipTokenizer::from_dir(&dir).unwrap();
        assert_eq!(tok.pad_id(), 0);
        check_folder(&tok, "tokenizer_sd2");
        for (text, want) in [
            ("cat!!!", &[2512, 2368, 0, 0, 0, 2513][..]),
            ("Cat <|ENDOFTEXT|>!", &[2512, 2368, 2513, 0, 2513][..]),
        ] {
            assert_eq!(&tok.encode(text).unwrap()[..want.len()], want, "{text}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// `added_tokens_decoder` entries beyond the vocabulary (textual inversion)
/// get their ids; an id the vocabulary contradicts is an error naming it.
#[test]
fn added_tokens_decoder_adds_tokens_at_their_ids() {
    let dir = copy_fixture("tokenizer", &SLOW_FILES, "added-tokens");
    let token = serde_json::json!({"content": "<cat-toy>", "special": false});
    edit_json(&dir, "tokenizer_config.json", |c| {
        let added = c["added_tokens_decoder"].as_object_mut().unwrap();
        added.insert("2514".into(), token.clone());
    });
    let tok = ClipTokenizer::from_dir(&dir).unwrap();
    assert_eq!(tok.vocab_size(), 2515);
    assert_eq!(
        tok.encode("a<cat-toy> cat").unwrap()[..5],
        [2512, 320, 2514, 2368, 2513]
    );

    edit_json(&dir, "tokenizer_config.json", |c| {
        let added = c["added_tokens_decoder"].as_object_mut().unwrap();
        added.remove("2514").unwrap();
        added.insert("2600".into(), token);
    });
    let msg = error_of(&dir);
    assert!(
        msg.contains("added_tokens_decoder.2600") && msg.contains("<cat-toy>"),
        "{msg}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn truncation_keeps_bos_and_eos() {
    let tok = ClipTokenizer::from_dir(&fixture("tokenizer")).unwrap();
    let ids = tok.encode(&"cat ".repeat(200)).unwrap();
    assert_eq!(ids.len(), 77);
    assert_eq!((ids[0], ids[76]), (2512, 2513));
    assert!(ids[1..76].iter().all(|&i| i == ids[1] && i != 2513));
}

#[test]
fn missing_folder_names_vocab_json() {
    let dir = fixture("no_such_tokenizer");
    let msg = error_of(&dir);
    assert!(
        msg.contains(&dir.join("vocab.json").display().to_string()) && msg.contains("cannot read"),
        "{msg}"
    );
}

#[test]
fn missing_merges_names_it() {
    let dir = copy_fixture("tokenizer", &["vocab.json"], "no-merges");
    let msg = error_of(&dir);
    assert!(
        msg.contains(&dir.join("merges.txt").display().to_string()),
        "{msg}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_json_names_the_file() {
    for file in ["vocab.json", "tokenizer.json", "tokenizer_config.json"] {
        let dir = copy_fixture("tokenizer_sd2", &SLOW_FILES, "bad-json");
        std::fs::write(dir.join(file), "{\"not json").unwrap();
        let msg = error_of(&dir);
        assert!(
            msg.contains(&dir.join(file).display().to_string()),
            "{file}: {msg}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn bad_merges_line_names_file_and_line() {
    let dir = copy_fixture("tokenizer", &SLOW_FILES, "bad-merges");
    let merges = std::fs::read_to_string(dir.join("merges.txt")).unwrap();
    std::fs::write(
        dir.join("merges.txt"),
        merges.replacen("\nt h\n", "\nt h x\n", 1),
    )
    .unwrap();
    let msg = error_of(&dir);
    let path = dir.join("merges.txt").display().to_string();
    assert!(msg.contains(&path) && msg.contains("line 3"), "{msg}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unknown_special_token_is_named() {
    for (folder, files) in [
        ("tokenizer", &SLOW_FILES[..]),
        (
            "tokenizer_sd2",
            &["tokenizer.json", "special_tokens_map.json"][..],
        ),
    ] {
        let dir = copy_fixture(folder, files, "unknown-special");
        let map = dir.join("special_tokens_map.json");
        let text = std::fs::read_to_string(&map).unwrap();
        let text = text.replacen("\"pad_token\": ", "\"pad_token\": \"<|pad|>\", \"x\": ", 1);
        std::fs::write(&map, text).unwrap();
        let msg = error_of(&dir);
        assert!(
            msg.contains("<|pad|>") && msg.contains("pad_token"),
            "{folder}: {msg}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn bad_model_max_length_is_named() {
    let dir = copy_fixture("tokenizer", &SLOW_FILES, "bad-max-length");
    std::fs::write(
        dir.join("tokenizer_config.json"),
        "{\"model_max_length\": 1}",
    )
    .unwrap();
    let msg = error_of(&dir);
    assert!(msg.contains("model_max_length"), "{msg}");
    std::fs::remove_dir_all(&dir).unwrap();
}
