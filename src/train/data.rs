//! Training data: where the images come from, how each one is preprocessed,
//! the order they are visited in and a background loader that prefetches
//! micro-batches.
//!
//! Three sources are supported:
//!
//! * a diffusers `imagefolder` with one or more `metadata.jsonl` files (one JSON
//!   object per line with `file_name` and the caption column);
//! * a kohya-style folder where every image has a `.txt` caption file of the
//!   same stem next to it (used when the folder holds no `metadata.jsonl`);
//! * a built-in procedural dataset of coloured shapes on a dark grey background
//!   that needs no files at all.
//!
//! Preprocessing follows diffusers' `train_text_to_image.py`: convert to RGB,
//! resize the shorter side to `resolution` (bilinear with antialiasing, like
//! torchvision's `Resize` on a PIL image), center or random crop, optional random
//! horizontal flip, then normalize to `[-1, 1]` as CHW `f32`.
//!
//! All randomness (epoch order, crop offsets, flips, built-in examples) comes
//! from ChaCha8 streams keyed by `(seed, epoch, index)` and is drawn with our
//! own integer sampling, so a run resumed from a [`Position`] sees exactly the
//! batches the uninterrupted run would have seen.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{file_err, Error, Result};

/// Where the images come from and how they are preprocessed (diffusers
/// `train_text_to_image` names and defaults): the config's `[data]` section.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataOptions {
    /// Folder of training images; `None` selects the built-in procedural dataset.
    pub train_data_dir: Option<PathBuf>,
    /// Column of `metadata.jsonl` holding the image's relative path. The default
    /// `"image"` means the standard `file_name` column.
    pub image_column: String,
    /// Column of `metadata.jsonl` holding the caption (default `"text"`).
    pub caption_column: String,
    /// Side of the square training images in pixels (default 512).
    pub resolution: usize,
    /// Center crop after resizing (default `false`: random crop).
    pub center_crop: bool,
    /// Flip horizontally with probability 0.5 (default `false`).
    pub random_flip: bool,
    /// Number of examples of the built-in dataset (default 512).
    pub builtin_size: usize,
    /// Train on a seeded random subset of this many examples (see
    /// [`Dataset::select`]).
    pub max_train_samples: Option<usize>,
    /// Encode each preprocessed image with the VAE once and keep its latents
    /// in `OUTPUT_DIR/cache/latents/` (the latent sample is drawn once per
    /// image; see `train::cache`).
    pub cache_latents: bool,
    /// Encode each caption once and keep its text states in
    /// `OUTPUT_DIR/cache/text/`.
    pub cache_text_embeddings: bool,
}

impl Default for DataOptions {
    fn default() -> Self {
        DataOptions {
            train_data_dir: None,
            image_column: "image".to_string(),
            caption_column: "text".to_string(),
            resolution: 512,
            center_crop: false,
            random_flip: false,
            builtin_size: 512,
            max_train_samples: None,
            cache_latents: false,
            cache_text_embeddings: false,
        }
    }
}

/// One image of a folder dataset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    /// Path of the image file.
    pub path: PathBuf,
    /// Its caption (the first one when the metadata lists several).
    pub caption: String,
    /// Further captions when the metadata's caption column holds a list of
    /// strings; like diffusers, training picks one of all of them at random
    /// (keyed by seed, epoch and index, see [`Dataset::caption_at`]).
    pub extra_captions: Vec<String>,
}

/// What a [`Dataset`] reads its examples from.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    /// Image files with captions.
    Folder(Vec<Item>),
    /// The built-in procedural dataset: example `i` is
    /// [`builtin_example`]`(seed, i)`; the captions are precomputed.
    Builtin {
        /// Seed the examples are generated from.
        seed: u64,
        /// Caption of every example.
        captions: Vec<String>,
    },
}

/// A dataset of captioned images, preprocessed on demand.
#[derive(Clone, Debug)]
pub struct Dataset {
    source: Source,
    resolution: usize,
    center_crop: bool,
    random_flip: bool,
    seed: u64,
    /// The folder (or "built-in dataset"), for error messages.
    label: String,
    /// How the folder was read, for [`Dataset::describe`].
    form: &'static str,
}

/// Image extensions (lower case) the folder forms pick up.
pub const IMAGE_EXTENSIONS: [&str; 5] = ["png", "jpg", "jpeg", "webp", "bmp"];

/// Name of the diffusers `imagefolder` metadata file.
const METADATA_FILE: &str = "metadata.jsonl";

// Domain tags that keep the random streams of different purposes apart.
const TAG_ORDER: u64 = 1;
const TAG_AUGMENT: u64 = 2;
const TAG_BUILTIN: u64 = 3;
const TAG_CAPTION: u64 = 4;

impl Dataset {
    /// Scan a folder, or build the built-in dataset when
    /// `opts.train_data_dir` is `None`.
    ///
    /// `seed` keys the random crops and flips of [`Dataset::load`] and the
    /// examples of the built-in dataset.
    ///
    /// Errors (all before training starts): a resolution of 0, a missing
    /// folder, a folder without images, a `metadata.jsonl` line that is not a
    /// JSON object or lacks the image or caption column (naming the file, line,
    /// column and the columns found), a listed image that does not exist, or,
    /// in the sidecar form, an image without a `.txt` caption (naming it).
    pub fn open(opts: &DataOptions, seed: u64) -> Result<Dataset> {
        let (source, label, form) = match &opts.train_data_dir {
            None => {
                if opts.builtin_size == 0 {
                    return Err(file_err(
                        Path::new("built-in dataset"),
                        "builtin_size must be at least 1",
                    ));
                }
                let captions = (0..opts.builtin_size)
                    .map(|i| builtin_caption(seed, i))
                    .collect();
                (
                    Source::Builtin { seed, captions },
                    "built-in dataset".to_string(),
                    "procedural shapes",
                )
            }
            Some(dir) => {
                if !dir.is_dir() {
                    let msg = if dir.exists() {
                        "train_data_dir is not a folder"
                    } else {
                        "train_data_dir not found"
                    };
                    return Err(file_err(dir, msg));
                }
                let mut metadata = Vec::new();
                let mut images = Vec::new();
                walk(dir, &mut metadata, &mut images)?;
                let (items, form) = if metadata.is_empty() {
                    (sidecar_items(dir, images)?, "images with .txt captions")
                } else {
                    metadata.sort();
                    let mut items = Vec::new();
                    for file in &metadata {
                        items.extend(metadata_items(file, opts)?);
                    }
                    if items.is_empty() {
                        return Err(file_err(&metadata[0], "metadata lists no images"));
                    }
                    (items, "metadata.jsonl")
                };
                (Source::Folder(items), dir.display().to_string(), form)
            }
        };
        if opts.resolution == 0 {
            return Err(file_err(Path::new(&label), "resolution must be at least 1"));
        }
        Ok(Dataset {
            source,
            resolution: opts.resolution,
            center_crop: opts.center_crop,
            random_flip: opts.random_flip,
            seed,
            label,
            form,
        })
    }

    /// Keep `n` examples (all when there are fewer), diffusers'
    /// `max_train_samples`: a seeded random subset, in the order of a
    /// shuffle keyed by `seed`, as `dataset.shuffle(seed).select(range(n))`.
    pub fn select(&mut self, n: usize, seed: u64) {
        if n >= self.len() {
            return;
        }
        let keep: Vec<usize> = epoch_order(seed, u64::MAX, self.len())
            .into_iter()
            .take(n)
            .collect();
        match &mut self.source {
            Source::Folder(items) => *items = keep.iter().map(|&i| items[i].clone()).collect(),
            Source::Builtin { captions, .. } => captions.truncate(n),
        }
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        match &self.source {
            Source::Folder(items) => items.len(),
            Source::Builtin { captions, .. } => captions.len(),
        }
    }

    /// Whether the dataset has no examples (never true for an opened one).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Side of the square images [`Dataset::load`] returns.
    pub fn resolution(&self) -> usize {
        self.resolution
    }

    /// Whether this is the built-in procedural dataset.
    pub fn is_builtin(&self) -> bool {
        matches!(self.source, Source::Builtin { .. })
    }

    /// The examples' source.
    pub fn source(&self) -> &Source {
        &self.source
    }

    /// One line for logs, e.g. `"120 images from data/pokemon (metadata.jsonl), 512x512"`.
    pub fn describe(&self) -> String {
        let r = self.resolution;
        format!(
            "{} images from {} ({}), {r}x{r}",
            self.len(),
            self.label,
            self.form
        )
    }

    /// Caption of example `i` (the first caption when the metadata lists
    /// several). Panics if `i >= len()`.
    pub fn caption(&self, i: usize) -> &str {
        match &self.source {
            Source::Folder(items) => &items[i].caption,
            Source::Builtin { captions, .. } => &captions[i],
        }
    }

    /// The caption of example `i` used for training in `epoch`: the caption,
    /// or, when the metadata lists several, one of them chosen at random keyed
    /// by `(seed, epoch, i)`. Panics if `i >= len()`.
    pub fn caption_at(&self, i: usize, epoch: u64) -> &str {
        match &self.source {
            Source::Folder(items) if !items[i].extra_captions.is_empty() => {
                let item = &items[i];
                let mut rng = keyed_rng(TAG_CAPTION, self.seed, epoch, i as u64);
                match below(&mut rng, item.extra_captions.len() + 1) {
                    0 => &item.caption,
                    k => &item.extra_captions[k - 1],
                }
            }
            _ => self.caption(i),
        }
    }

    /// Path of example `i`'s image, `None` for the built-in dataset.
    pub fn path(&self, i: usize) -> Option<&Path> {
        match &self.source {
            Source::Folder(items) => items.get(i).map(|it| it.path.as_path()),
            Source::Builtin { .. } => None,
        }
    }

    /// Decode and preprocess example `i` for `epoch`: RGB, resize the shorter
    /// side to the resolution (triangle filter with antialiasing, like
    /// torchvision's bilinear `Resize`), center or random crop, random
    /// horizontal flip (if enabled), normalized to `[-1, 1]`, as CHW `f32`
    /// (`3 * res * res` values). The crop offset and flip are keyed by
    /// `(seed, epoch, i)`.
    ///
    /// Built-in examples are rendered directly at the resolution; crop and
    /// flip do not apply to them (a flip would swap left and right and
    /// contradict the caption).
    ///
    /// Errors name the image's path (missing, unreadable or corrupt file).
    pub fn load(&self, i: usize, epoch: u64) -> Result<Vec<f32>> {
        self.load_inner(i, epoch).map_err(|msg| match self.path(i) {
            Some(p) => file_err(p, msg),
            None => file_err(Path::new(&self.label), msg),
        })
    }

    /// [`Dataset::load`] with the error as a message that does not repeat the path.
    fn load_inner(&self, i: usize, epoch: u64) -> std::result::Result<Vec<f32>, String> {
        match &self.source {
            Source::Builtin { seed, captions } => {
                if i >= captions.len() {
                    return Err(format!(
                        "example {i} out of range ({} examples)",
                        captions.len()
                    ));
                }
                Ok(builtin_render(*seed, i, self.resolution))
            }
            Source::Folder(items) => {
                let item = items
                    .get(i)
                    .ok_or_else(|| format!("example {i} out of range ({} images)", items.len()))?;
                let img = decode(&item.path)?;
                let mut rng = keyed_rng(TAG_AUGMENT, self.seed, epoch, i as u64);
                Ok(preprocess(
                    &img,
                    self.resolution,
                    self.center_crop,
                    self.random_flip,
                    &mut rng,
                ))
            }
        }
    }
}

/// Collect `metadata.jsonl` files and image files under `dir`, recursively.
/// Hidden entries (names starting with `.`) are skipped and symbolic links to
/// folders are not followed.
fn walk(dir: &Path, metadata: &mut Vec<PathBuf>, images: &mut Vec<PathBuf>) -> Result<()> {
    let entries = fs::read_dir(dir).map_err(|e| file_err(dir, format!("cannot list: {e}")))?;
    for entry in entries {
        let entry = entry.map_err(|e| file_err(dir, format!("cannot list: {e}")))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        if is_dir {
            walk(&path, metadata, images)?;
        } else if path.is_file() {
            if name == METADATA_FILE {
                metadata.push(path);
            } else if is_image(&path) {
                images.push(path);
            }
        }
    }
    Ok(())
}

/// Whether the path has one of [`IMAGE_EXTENSIONS`] (case-insensitive).
fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// The sidecar form: every image with the trimmed text of `STEM.txt` next to it.
fn sidecar_items(dir: &Path, mut images: Vec<PathBuf>) -> Result<Vec<Item>> {
    if images.is_empty() {
        return Err(file_err(
            dir,
            format!(
                "no images found (looked for {} files with .txt captions, or a {METADATA_FILE})",
                IMAGE_EXTENSIONS.join("/")
            ),
        ));
    }
    images.sort();
    let missing: Vec<&PathBuf> = images
        .iter()
        .filter(|p| !p.with_extension("txt").is_file())
        .collect();
    if let Some(first) = missing.first() {
        let more = match missing.len() - 1 {
            0 => String::new(),
            k => format!(" ({k} more images lack one)"),
        };
        return Err(file_err(
            first,
            format!(
                "image has no caption: expected {} next to it{more}",
                first.with_extension("txt").display()
            ),
        ));
    }
    images
        .into_iter()
        .map(|path| {
            let txt = path.with_extension("txt");
            let caption = fs::read_to_string(&txt)
                .map_err(|e| file_err(&txt, format!("cannot read caption: {e}")))?;
            Ok(Item {
                path,
                caption: caption.trim().to_string(),
                extra_captions: Vec::new(),
            })
        })
        .collect()
}

/// The items listed by one `metadata.jsonl`; image paths are relative to its folder.
fn metadata_items(file: &Path, opts: &DataOptions) -> Result<Vec<Item>> {
    let text = fs::read_to_string(file).map_err(|e| file_err(file, format!("cannot read: {e}")))?;
    let base = file.parent().unwrap_or(Path::new(""));
    let path_column = if opts.image_column == "image" {
        "file_name"
    } else {
        opts.image_column.as_str()
    };
    let mut items = Vec::new();
    for (k, line) in text.lines().enumerate() {
        let lineno = k + 1;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| file_err(file, format!("line {lineno}: not valid JSON: {e}")))?;
        let serde_json::Value::Object(obj) = value else {
            return Err(file_err(
                file,
                format!("line {lineno}: expected a JSON object"),
            ));
        };
        let columns = || {
            let names: Vec<&str> = obj.keys().map(String::as_str).collect();
            names.join(", ")
        };
        let rel = match obj.get(path_column) {
            Some(serde_json::Value::String(s)) => s,
            Some(other) => {
                return Err(file_err(
                    file,
                    format!(
                        "line {lineno}: image column '{path_column}' must be a string path, \
                         found {other}"
                    ),
                ))
            }
            None => {
                return Err(file_err(
                    file,
                    format!(
                        "line {lineno}: no image column '{path_column}'; columns found: {}",
                        columns()
                    ),
                ))
            }
        };
        let caption_column = opts.caption_column.as_str();
        let mut captions = match obj.get(caption_column) {
            Some(serde_json::Value::String(s)) => vec![s.clone()],
            Some(serde_json::Value::Array(list))
                if !list.is_empty() && list.iter().all(|v| v.is_string()) =>
            {
                list.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            }
            Some(other) => {
                return Err(file_err(
                    file,
                    format!(
                        "line {lineno}: caption column '{caption_column}' must hold a string \
                         or a list of strings, found {other}"
                    ),
                ))
            }
            None => {
                return Err(file_err(
                    file,
                    format!(
                        "line {lineno}: no caption column '{caption_column}'; columns found: {} \
                         (set caption_column to one of them)",
                        columns()
                    ),
                ))
            }
        };
        let path = base.join(rel);
        if !path.is_file() {
            return Err(file_err(
                file,
                format!(
                    "line {lineno}: image '{rel}' not found (looked for {})",
                    path.display()
                ),
            ));
        }
        let caption = captions.remove(0);
        items.push(Item {
            path,
            caption,
            extra_captions: captions,
        });
    }
    Ok(items)
}

/// Read and decode an image (format guessed from its content, then its extension).
fn decode(path: &Path) -> std::result::Result<image::DynamicImage, String> {
    image::ImageReader::open(path)
        .map_err(|e| format!("cannot open image: {e}"))?
        .with_guessed_format()
        .map_err(|e| format!("cannot read image: {e}"))?
        .decode()
        .map_err(|e| format!("cannot decode image: {e}"))
}

/// torchvision's output size of `Resize(res)`: the shorter side becomes `res`,
/// the longer one `int(res * long / short)`. Returns `(width, height)`.
fn resized_size(w: usize, h: usize, res: usize) -> (usize, usize) {
    let long_of =
        |short: usize, long: usize| ((res as f64 * long as f64 / short as f64) as usize).max(res);
    if w <= h {
        (res, long_of(w, h))
    } else {
        (long_of(h, w), res)
    }
}

/// Resize, crop, flip and normalize a decoded image into CHW `f32` in `[-1, 1]`.
/// Randomness is drawn from `rng` in the order: crop top, crop left, flip.
fn preprocess(
    img: &image::DynamicImage,
    res: usize,
    center_crop: bool,
    random_flip: bool,
    rng: &mut ChaCha8Rng,
) -> Vec<f32> {
    let rgb = img.to_rgb8();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    let (nw, nh) = resized_size(w.max(1), h.max(1), res);
    let resized = if (nw, nh) == (w, h) {
        rgb
    } else {
        image::imageops::resize(
            &rgb,
            nw as u32,
            nh as u32,
            image::imageops::FilterType::Triangle,
        )
    };
    let (top, left) = if center_crop {
        // torchvision's CenterCrop: int(round((size - crop) / 2.0)), ties to even.
        let off = |n: usize| ((n - res) as f64 / 2.0).round_ties_even() as usize;
        (off(nh), off(nw))
    } else {
        let top = below(rng, nh - res + 1);
        let left = below(rng, nw - res + 1);
        (top, left)
    };
    let flip = random_flip && rng.next_u32() & 1 == 1;
    let mut out = vec![0.0f32; 3 * res * res];
    let plane = res * res;
    for y in 0..res {
        for x in 0..res {
            let sx = if flip { res - 1 - x } else { x };
            let p = resized.get_pixel((left + sx) as u32, (top + y) as u32).0;
            for c in 0..3 {
                out[c * plane + y * res + x] = p[c] as f32 / 127.5 - 1.0;
            }
        }
    }
    out
}

/// A ChaCha8 stream keyed by a purpose tag and three numbers.
fn keyed_rng(tag: u64, a: u64, b: u64, c: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    for (k, v) in [tag, a, b, c].into_iter().enumerate() {
        key[k * 8..k * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    ChaCha8Rng::from_seed(key)
}

/// A uniform integer in `0..bound` (Lemire's unbiased multiply-and-reject),
/// independent of `rand`'s own sampling so that it never changes across
/// versions. `bound` must be at least 1.
fn below(rng: &mut ChaCha8Rng, bound: usize) -> usize {
    let bound = bound.max(1) as u64;
    let threshold = bound.wrapping_neg() % bound;
    loop {
        let m = rng.next_u64() as u128 * bound as u128;
        if m as u64 >= threshold {
            return (m >> 64) as usize;
        }
    }
}

// ---------------------------------------------------------------------------
// Built-in procedural dataset
// ---------------------------------------------------------------------------

/// Shapes of the built-in dataset.
pub const BUILTIN_SHAPES: [&str; 3] = ["circle", "square", "triangle"];

/// Colours of the built-in dataset: name and RGB.
pub const BUILTIN_COLOURS: [(&str, [u8; 3]); 6] = [
    ("red", [220, 50, 50]),
    ("green", [50, 180, 70]),
    ("blue", [60, 100, 230]),
    ("yellow", [235, 215, 50]),
    ("purple", [150, 70, 200]),
    ("orange", [240, 140, 40]),
];

/// Sizes of the built-in dataset.
pub const BUILTIN_SIZES: [&str; 2] = ["small", "large"];

/// Positions of the built-in dataset.
pub const BUILTIN_POSITIONS: [&str; 5] = ["left", "right", "top", "bottom", "center"];

/// Background colour of the built-in dataset (dark grey).
pub const BUILTIN_BACKGROUND: [u8; 3] = [40, 40, 40];

/// Half extent of a shape, as a fraction of the image side, per size.
const BUILTIN_HALF_EXTENT: [f32; 2] = [0.08, 0.16];

/// Center of the shape, as fractions of the image side, per position.
const BUILTIN_CENTERS: [[f32; 2]; 5] = [[0.2, 0.5], [0.8, 0.5], [0.5, 0.2], [0.5, 0.8], [0.5, 0.5]];

/// One example of the built-in dataset, as indices into the `BUILTIN_*` tables.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BuiltinExample {
    /// Index into [`BUILTIN_SHAPES`].
    pub shape: usize,
    /// Index into [`BUILTIN_COLOURS`].
    pub colour: usize,
    /// Index into [`BUILTIN_SIZES`].
    pub size: usize,
    /// Index into [`BUILTIN_POSITIONS`].
    pub position: usize,
    /// Small shift of the shape's center, as fractions of the image side
    /// (each within ±0.03), so that examples of one caption differ.
    pub offset: [f32; 2],
}

impl BuiltinExample {
    /// The caption, e.g. `"a small red circle on the left"` or
    /// `"a large blue square in the center"`.
    pub fn caption(&self) -> String {
        let place = match BUILTIN_POSITIONS[self.position] {
            "left" => "on the left",
            "right" => "on the right",
            "top" => "at the top",
            "bottom" => "at the bottom",
            _ => "in the center",
        };
        format!(
            "a {} {} {} {place}",
            BUILTIN_SIZES[self.size], BUILTIN_COLOURS[self.colour].0, BUILTIN_SHAPES[self.shape]
        )
    }

    /// Render at `res` x `res` without antialiasing as CHW `f32` in `[-1, 1]`:
    /// a pixel has the shape's colour when its center lies inside the shape,
    /// the background colour otherwise. A shape too small to cover any pixel
    /// center still colours the pixel under its center.
    pub fn render(&self, res: usize) -> Vec<f32> {
        let [bx, by] = BUILTIN_CENTERS[self.position];
        let (cx, cy) = (bx + self.offset[0], by + self.offset[1]);
        let r = BUILTIN_HALF_EXTENT[self.size];
        let shape = self.shape;
        let inside = |px: f32, py: f32| -> bool {
            let (dx, dy) = (px - cx, py - cy);
            match shape {
                0 => dx * dx + dy * dy <= r * r,
                1 => dx.abs() <= 0.85 * r && dy.abs() <= 0.85 * r,
                _ => {
                    // Apex at the top, base at the bottom, widening linearly.
                    let t = (dy + r) / (2.0 * r);
                    (0.0..=1.0).contains(&t) && dx.abs() <= 1.15 * r * t
                }
            }
        };
        let n = res.max(1);
        let mut mask = vec![false; n * n];
        let mut any = false;
        for y in 0..n {
            for x in 0..n {
                let (px, py) = ((x as f32 + 0.5) / n as f32, (y as f32 + 0.5) / n as f32);
                if inside(px, py) {
                    mask[y * n + x] = true;
                    any = true;
                }
            }
        }
        if !any {
            let px = ((cx * n as f32) as usize).min(n - 1);
            let py = ((cy * n as f32) as usize).min(n - 1);
            mask[py * n + px] = true;
        }
        let fg = BUILTIN_COLOURS[self.colour].1;
        let plane = n * n;
        let mut out = vec![0.0f32; 3 * plane];
        for (p, &m) in mask.iter().enumerate() {
            let rgb = if m { fg } else { BUILTIN_BACKGROUND };
            for c in 0..3 {
                out[c * plane + p] = rgb[c] as f32 / 127.5 - 1.0;
            }
        }
        out
    }
}

/// Example `i` of the built-in dataset generated from `seed`.
pub fn builtin_example(seed: u64, i: usize) -> BuiltinExample {
    let mut rng = keyed_rng(TAG_BUILTIN, seed, 0, i as u64);
    let shape = below(&mut rng, BUILTIN_SHAPES.len());
    let colour = below(&mut rng, BUILTIN_COLOURS.len());
    let size = below(&mut rng, BUILTIN_SIZES.len());
    let position = below(&mut rng, BUILTIN_POSITIONS.len());
    let dx = (below(&mut rng, 61) as f32 - 30.0) / 1000.0;
    let dy = (below(&mut rng, 61) as f32 - 30.0) / 1000.0;
    BuiltinExample {
        shape,
        colour,
        size,
        position,
        offset: [dx, dy],
    }
}

/// Caption of built-in example `i`.
pub fn builtin_caption(seed: u64, i: usize) -> String {
    builtin_example(seed, i).caption()
}

/// Built-in example `i` rendered at `res` x `res` as CHW `f32` in `[-1, 1]`.
pub fn builtin_render(seed: u64, i: usize, res: usize) -> Vec<f32> {
    builtin_example(seed, i).render(res)
}

// ---------------------------------------------------------------------------
// Order and loader
// ---------------------------------------------------------------------------

/// A seeded permutation of `0..n` for an epoch (ChaCha8 keyed by
/// `(seed, epoch)`, Fisher-Yates); same inputs, same order.
pub fn epoch_order(seed: u64, epoch: u64, n: usize) -> Vec<usize> {
    let mut rng = keyed_rng(TAG_ORDER, seed, epoch, 0);
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = below(&mut rng, i + 1);
        order.swap(i, j);
    }
    order
}

/// Full batches per epoch assuming every image loads: `n / batch_size`
/// (drop-last); 0 for a batch size of 0.
pub fn batches_per_epoch(n: usize, batch_size: usize) -> usize {
    n.checked_div(batch_size).unwrap_or(0)
}

/// Where the loader is: epoch and how many entries of that epoch's order have
/// been consumed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Position {
    /// Epoch, from 0.
    pub epoch: u64,
    /// Entries of [`epoch_order`] already consumed in this epoch.
    pub cursor: usize,
}

/// The images and captions of one micro-batch.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// `[B, 3, res, res]` in `[-1, 1]`.
    pub images: Vec<f32>,
    /// One caption per image.
    pub captions: Vec<String>,
    /// Dataset indices of the images.
    pub indices: Vec<usize>,
    /// Epoch the batch belongs to.
    pub epoch: u64,
    /// Position after this batch (what a checkpoint stores). When fewer
    /// entries than a batch remain in the epoch it is already the start of
    /// the next epoch.
    pub next: Position,
    /// Images skipped while filling this batch: path and reason.
    pub skipped: Vec<(PathBuf, String)>,
}

/// Background-thread prefetching loader.
///
/// Starting at a [`Position`], it yields batches of exactly `batch_size`
/// examples in the order of [`epoch_order`]. When fewer than `batch_size`
/// entries remain in an epoch, they are dropped and the next epoch starts at
/// cursor 0 (drop-last). An image that cannot be read or decoded is skipped,
/// reported in [`Batch::skipped`] and replaced by the next entry of the order;
/// a partial batch at the end of an epoch is dropped too. The sequence of
/// batches depends only on the dataset, the seed and the start position, so a
/// run resumed from a batch's `next` sees the same batches as one that went on.
///
/// Images of a batch are decoded on a few threads at once; up to `depth`
/// finished batches wait in a bounded channel. Dropping the loader stops its
/// thread. Where threads cannot be started (the browser) batches are made
/// when asked for, the same batches.
pub struct Loader {
    feed: Feed,
    /// The fatal error already returned (path, message), returned again by
    /// later calls to [`Loader::next`].
    failed: Option<(String, String)>,
}

enum Feed {
    Thread {
        rx: Option<Receiver<Result<Batch>>>,
        stop: Arc<AtomicBool>,
        handle: Option<JoinHandle<()>>,
    },
    Inline {
        dataset: Arc<Dataset>,
        seed: u64,
        batch_size: usize,
        pos: Position,
        orders: OrderCache,
    },
}

impl Loader {
    /// Start the loader thread at `start`, keeping up to `depth` (at least 1)
    /// batches ready. A `batch_size` of 0 makes [`Loader::next`] fail.
    pub fn new(
        dataset: Arc<Dataset>,
        seed: u64,
        batch_size: usize,
        start: Position,
        depth: usize,
    ) -> Loader {
        let (tx, rx) = sync_channel(depth.max(1));
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = Arc::clone(&stop);
        let thread_dataset = Arc::clone(&dataset);
        let handle = std::thread::Builder::new()
            .name("difftrain-data".to_string())
            .spawn(move || produce(&thread_dataset, seed, batch_size, start, &tx, &thread_stop));
        let feed = match handle {
            Ok(handle) => Feed::Thread {
                rx: Some(rx),
                stop,
                handle: Some(handle),
            },
            Err(_) => Feed::Inline {
                dataset,
                seed,
                batch_size,
                pos: start,
                orders: OrderCache::default(),
            },
        };
        Loader { feed, failed: None }
    }

    /// The next batch (blocks until it is ready). Errs when a whole epoch has
    /// fewer loadable images than the batch size (so it cannot loop forever),
    /// and from then on.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Batch> {
        if let Some((path, msg)) = &self.failed {
            return Err(Error::File {
                path: path.clone(),
                msg: msg.clone(),
            });
        }
        let result = match &mut self.feed {
            Feed::Thread { rx, .. } => {
                rx.as_ref()
                    .and_then(|rx| rx.recv().ok())
                    .unwrap_or_else(|| {
                        Err(Error::File {
                            path: "data loader".to_string(),
                            msg: "the loader thread stopped unexpectedly".to_string(),
                        })
                    })
            }
            Feed::Inline {
                dataset,
                seed,
                batch_size,
                pos,
                orders,
            } => {
                let never = AtomicBool::new(false);
                let batch = fill_batch(dataset, *seed, *batch_size, *pos, orders, 1, &never)
                    .map(|b| b.expect("no stop was requested"));
                if let Ok(b) = &batch {
                    *pos = b.next;
                }
                batch
            }
        };
        if let Err(e) = &result {
            self.failed = Some(match e {
                Error::File { path, msg } => (path.clone(), msg.clone()),
                other => ("data loader".to_string(), other.to_string()),
            });
        }
        result
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        if let Feed::Thread { rx, stop, handle } = &mut self.feed {
            stop.store(true, Ordering::Relaxed);
            // Dropping the receiver makes a blocked `send` fail, so the thread exits.
            *rx = None;
            if let Some(handle) = handle.take() {
                let _ = handle.join();
            }
        }
    }
}

/// The loader thread: fill batches one after another until the receiver is
/// gone, a stop is requested or an error is sent.
fn produce(
    dataset: &Dataset,
    seed: u64,
    batch_size: usize,
    start: Position,
    tx: &SyncSender<Result<Batch>>,
    stop: &AtomicBool,
) {
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 8);
    let mut orders = OrderCache::default();
    let mut pos = start;
    loop {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        match fill_batch(dataset, seed, batch_size, pos, &mut orders, workers, stop) {
            Ok(Some(batch)) => {
                pos = batch.next;
                if tx.send(Ok(batch)).is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        }
    }
}

/// The most recent epoch's order, so that it is not reshuffled for every batch.
#[derive(Default)]
struct OrderCache {
    key: Option<(u64, u64, usize)>,
    order: Vec<usize>,
}

impl OrderCache {
    fn get(&mut self, seed: u64, epoch: u64, n: usize) -> &[usize] {
        if self.key != Some((seed, epoch, n)) {
            self.order = epoch_order(seed, epoch, n);
            self.key = Some((seed, epoch, n));
        }
        &self.order
    }
}

/// The batch that starts at `start`: a pure function of the dataset, seed,
/// batch size and start (the cache and the worker count do not change it).
/// `Ok(None)` when a stop was requested.
fn fill_batch(
    dataset: &Dataset,
    seed: u64,
    batch_size: usize,
    start: Position,
    orders: &mut OrderCache,
    workers: usize,
    stop: &AtomicBool,
) -> Result<Option<Batch>> {
    let n = dataset.len();
    let label = Path::new(&dataset.label);
    if batch_size == 0 {
        return Err(file_err(label, "batch size must be at least 1"));
    }
    if n < batch_size {
        return Err(file_err(
            label,
            format!("the dataset has {n} examples, fewer than the batch size {batch_size}"),
        ));
    }
    let res = dataset.resolution();
    let per_image = 3 * res * res;
    let mut skipped: Vec<(PathBuf, String)> = Vec::new();
    let mut pos = start;
    loop {
        if n.saturating_sub(pos.cursor) < batch_size {
            pos = Position {
                epoch: pos.epoch + 1,
                cursor: 0,
            };
        }
        let from_zero = pos.cursor == 0;
        let epoch = pos.epoch;
        let order = orders.get(seed, epoch, n);
        let mut images = Vec::with_capacity(batch_size * per_image);
        let mut indices = Vec::with_capacity(batch_size);
        let mut failed_here = 0usize;
        let mut cursor = pos.cursor;
        while indices.len() < batch_size {
            let need = batch_size - indices.len();
            if n - cursor < need {
                break;
            }
            let candidates = &order[cursor..cursor + need];
            cursor += need;
            let results = load_many(dataset, candidates, epoch, workers);
            if stop.load(Ordering::Relaxed) {
                return Ok(None);
            }
            for (&idx, r) in candidates.iter().zip(results) {
                match r {
                    Ok(img) => {
                        images.extend_from_slice(&img);
                        indices.push(idx);
                    }
                    Err(msg) => {
                        failed_here += 1;
                        let path = dataset.path(idx).map(Path::to_path_buf).unwrap_or_default();
                        skipped.push((path, msg));
                    }
                }
            }
        }
        if indices.len() == batch_size {
            let next = if n - cursor < batch_size {
                Position {
                    epoch: epoch + 1,
                    cursor: 0,
                }
            } else {
                Position { epoch, cursor }
            };
            let captions = indices
                .iter()
                .map(|&i| dataset.caption_at(i, epoch).to_string())
                .collect();
            return Ok(Some(Batch {
                images,
                captions,
                indices,
                epoch,
                next,
                skipped,
            }));
        }
        if from_zero {
            // A whole epoch was visited without filling one batch.
            let examples: Vec<String> = skipped
                .iter()
                .rev()
                .take(3)
                .map(|(p, m)| format!("{}: {m}", p.display()))
                .collect();
            return Err(file_err(
                label,
                format!(
                    "epoch {epoch}: fewer than batch size {batch_size} of the {n} images can be \
                     loaded ({failed_here} failed; e.g. {})",
                    examples.join("; ")
                ),
            ));
        }
        pos = Position {
            epoch: epoch + 1,
            cursor: 0,
        };
    }
}

/// Load `indices` for `epoch`, on up to `workers` threads; results in order.
fn load_many(
    dataset: &Dataset,
    indices: &[usize],
    epoch: u64,
    workers: usize,
) -> Vec<std::result::Result<Vec<f32>, String>> {
    let workers = workers.min(indices.len());
    if workers <= 1 || dataset.is_builtin() {
        return indices
            .iter()
            .map(|&i| dataset.load_inner(i, epoch))
            .collect();
    }
    let chunk = indices.len().div_ceil(workers);
    std::thread::scope(|scope| {
        let handles: Vec<_> = indices
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .map(|&i| dataset.load_inner(i, epoch))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut out = Vec::with_capacity(indices.len());
        for (h, part) in handles.into_iter().zip(indices.chunks(chunk)) {
            match h.join() {
                Ok(results) => out.extend(results),
                Err(_) => out.extend(
                    part.iter()
                        .map(|_| Err("the image decoder panicked".to_string())),
                ),
            }
        }
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh, empty temporary folder for one test.
    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("difftrain-data-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn write_png(path: &Path, w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 3]) {
        image::RgbImage::from_fn(w, h, |x, y| image::Rgb(f(x, y)))
            .save(path)
            .unwrap();
    }

    fn opts(dir: &Path, res: usize) -> DataOptions {
        DataOptions {
            train_data_dir: Some(dir.to_path_buf()),
            resolution: res,
            ..DataOptions::default()
        }
    }

    /// A sidecar folder of `good` small images plus `bad` corrupt ones.
    fn sidecar_folder(name: &str, good: usize, bad: usize) -> PathBuf {
        let dir = temp_dir(name);
        for k in 0..good {
            let p = dir.join(format!("img{k:02}.png"));
            write_png(&p, 12 + k as u32, 10, |x, y| {
                [(x * 20) as u8, (y * 20) as u8, (k * 30) as u8]
            });
            fs::write(p.with_extension("txt"), format!("  picture {k}\n")).unwrap();
        }
        for k in 0..bad {
            let p = dir.join(format!("bad{k}.png"));
            fs::write(&p, b"this is not a png at all").unwrap();
            fs::write(p.with_extension("txt"), "broken").unwrap();
        }
        dir
    }

    #[test]
    fn defaults_match_diffusers() {
        let o = DataOptions::default();
        assert_eq!(o.train_data_dir, None);
        assert_eq!(o.image_column, "image");
        assert_eq!(o.caption_column, "text");
        assert_eq!(o.resolution, 512);
        assert!(!o.center_crop && !o.random_flip);
        assert_eq!(o.builtin_size, 512);
    }

    #[test]
    fn sidecar_folder_loads_with_captions() {
        let dir = sidecar_folder("sidecar", 3, 0);
        fs::create_dir_all(dir.join("sub")).unwrap();
        let p = dir.join("sub").join("deep.JPG");
        image::RgbImage::from_pixel(9, 9, image::Rgb([1, 2, 3]))
            .save_with_format(&p, image::ImageFormat::Jpeg)
            .unwrap();
        fs::write(dir.join("sub").join("deep.txt"), "deep one").unwrap();
        let ds = Dataset::open(&opts(&dir, 8), 1).unwrap();
        assert_eq!(ds.len(), 4);
        assert!(!ds.is_empty());
        assert_eq!(ds.caption(0), "picture 0");
        assert_eq!(ds.caption(2), "picture 2");
        assert_eq!(ds.caption(3), "deep one");
        for i in 0..ds.len() {
            let img = ds.load(i, 0).unwrap();
            assert_eq!(img.len(), 3 * 8 * 8);
            assert!(img.iter().all(|v| (-1.0..=1.0).contains(v)));
        }
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn sidecar_missing_caption_names_image() {
        let dir = sidecar_folder("nocaption", 2, 0);
        let p = dir.join("lonely.png");
        write_png(&p, 4, 4, |_, _| [0, 0, 0]);
        let err = Dataset::open(&opts(&dir, 4), 0).unwrap_err().to_string();
        assert!(err.contains("lonely.png"), "{err}");
        assert!(err.contains("lonely.txt"), "{err}");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn metadata_folder_loads_with_captions() {
        let dir = temp_dir("metadata");
        fs::create_dir_all(dir.join("imgs")).unwrap();
        write_png(&dir.join("imgs/a.png"), 6, 6, |_, _| [255, 0, 0]);
        write_png(&dir.join("b.png"), 6, 6, |_, _| [0, 0, 255]);
        fs::write(
            dir.join("metadata.jsonl"),
            "{\"file_name\": \"imgs/a.png\", \"text\": \"a red square\"}\n\n\
             {\"file_name\": \"b.png\", \"text\": [\"blue\", \"a blue square\"]}\n",
        )
        .unwrap();
        let ds = Dataset::open(&opts(&dir, 4), 0).unwrap();
        assert_eq!(ds.len(), 2);
        assert_eq!(ds.caption(0), "a red square");
        assert_eq!(ds.caption(1), "blue");
        let picked: std::collections::HashSet<&str> =
            (0..32).map(|e| ds.caption_at(1, e)).collect();
        assert_eq!(picked.len(), 2);
        let red = ds.load(0, 0).unwrap();
        assert!((red[0] - 1.0).abs() < 1e-6 && (red[16] + 1.0).abs() < 1e-6);

        // Another image column.
        fs::write(
            dir.join("metadata.jsonl"),
            "{\"path\": \"b.png\", \"caption\": \"blue\"}\n",
        )
        .unwrap();
        let o = DataOptions {
            image_column: "path".to_string(),
            caption_column: "caption".to_string(),
            ..opts(&dir, 4)
        };
        let ds = Dataset::open(&o, 0).unwrap();
        assert_eq!(ds.len(), 1);
        assert_eq!(ds.caption(0), "blue");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn metadata_errors_name_file_line_and_column() {
        let dir = temp_dir("metaerr");
        write_png(&dir.join("a.png"), 4, 4, |_, _| [9, 9, 9]);
        fs::write(
            dir.join("metadata.jsonl"),
            "{\"file_name\": \"a.png\", \"caption\": \"x\"}\n",
        )
        .unwrap();
        let err = Dataset::open(&opts(&dir, 4), 0).unwrap_err().to_string();
        assert!(err.contains("metadata.jsonl"), "{err}");
        assert!(err.contains("'text'"), "{err}");
        assert!(
            err.contains("caption, file_name") || err.contains("file_name, caption"),
            "{err}"
        );

        fs::write(
            dir.join("metadata.jsonl"),
            "{\"file_name\": \"a.png\", \"text\": \"x\"}\n{not json\n",
        )
        .unwrap();
        let err = Dataset::open(&opts(&dir, 4), 0).unwrap_err().to_string();
        assert!(
            err.contains("metadata.jsonl") && err.contains("line 2"),
            "{err}"
        );

        fs::write(
            dir.join("metadata.jsonl"),
            "{\"file_name\": \"missing.png\", \"text\": \"x\"}\n",
        )
        .unwrap();
        let err = Dataset::open(&opts(&dir, 4), 0).unwrap_err().to_string();
        assert!(err.contains("missing.png"), "{err}");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn empty_or_missing_folder_errors() {
        let dir = temp_dir("empty");
        let err = Dataset::open(&opts(&dir, 4), 0).unwrap_err().to_string();
        assert!(err.contains("no images"), "{err}");
        let missing = dir.join("nope");
        let err = Dataset::open(&opts(&missing, 4), 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope") && err.contains("not found"), "{err}");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn resize_and_center_crop_of_non_square_image() {
        // 40x20: left half red, right half blue. Resolution 10: resized to
        // 20x10, center crop keeps resized columns 5..15.
        let dir = temp_dir("crop");
        let p = dir.join("wide.png");
        write_png(
            &p,
            40,
            20,
            |x, _| if x < 20 { [255, 0, 0] } else { [0, 0, 255] },
        );
        fs::write(p.with_extension("txt"), "wide").unwrap();
        let o = DataOptions {
            center_crop: true,
            ..opts(&dir, 10)
        };
        let ds = Dataset::open(&o, 0).unwrap();
        let img = ds.load(0, 0).unwrap();
        assert_eq!(img.len(), 3 * 10 * 10);
        assert!(img.iter().all(|v| (-1.0..=1.0).contains(v)));
        let at = |c: usize, y: usize, x: usize| img[c * 100 + y * 10 + x];
        // Left column: resized column 5 samples source columns 9..13, all red.
        assert_eq!([at(0, 3, 0), at(1, 3, 0), at(2, 3, 0)], [1.0, -1.0, -1.0]);
        // Right column: resized column 14 samples source columns 27..31, all blue.
        assert_eq!([at(0, 7, 9), at(1, 7, 9), at(2, 7, 9)], [-1.0, -1.0, 1.0]);
        // The middle blends the two halves.
        assert!(at(0, 5, 4) > 0.0 && at(2, 5, 4) < at(0, 5, 4));
        assert!(at(2, 5, 5) > 0.0 && at(0, 5, 5) < at(2, 5, 5));
        assert_eq!(resized_size(40, 20, 10), (20, 10));
        assert_eq!(resized_size(30, 45, 20), (20, 30));

        // Random crop + flip: right size, reproducible per (epoch, i).
        let o = DataOptions {
            random_flip: true,
            ..opts(&dir, 10)
        };
        let ds = Dataset::open(&o, 7).unwrap();
        let a = ds.load(0, 3).unwrap();
        assert_eq!(a.len(), 300);
        assert_eq!(a, ds.load(0, 3).unwrap());
        let variants: std::collections::HashSet<Vec<u32>> = (0..16)
            .map(|e| ds.load(0, e).unwrap().iter().map(|v| v.to_bits()).collect())
            .collect();
        assert!(variants.len() > 1);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn corrupt_image_is_skipped_and_reported() {
        let dir = sidecar_folder("corrupt", 5, 1);
        let ds = Arc::new(Dataset::open(&opts(&dir, 6), 3).unwrap());
        assert_eq!(ds.len(), 6);
        let bad = (0..ds.len())
            .find(|&i| ds.path(i).unwrap().ends_with("bad0.png"))
            .unwrap();
        let err = ds.load(bad, 0).unwrap_err().to_string();
        assert!(err.contains("bad0.png"), "{err}");

        let mut loader = Loader::new(Arc::clone(&ds), 3, 5, Position::default(), 2);
        let mut reported = false;
        for _ in 0..20 {
            let b = loader.next().unwrap();
            assert_eq!(b.indices.len(), 5);
            assert_eq!(b.captions.len(), 5);
            assert_eq!(b.images.len(), 5 * 3 * 6 * 6);
            assert!(!b.indices.contains(&bad));
            for (p, reason) in &b.skipped {
                assert!(p.ends_with("bad0.png"));
                assert!(!reason.is_empty());
                reported = true;
            }
        }
        assert!(reported);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn unloadable_epoch_errors_instead_of_looping() {
        let dir = sidecar_folder("allbad", 1, 3);
        let ds = Arc::new(Dataset::open(&opts(&dir, 4), 0).unwrap());
        let mut loader = Loader::new(
            ds,
            0,
            2,
            Position {
                epoch: 0,
                cursor: 1,
            },
            2,
        );
        let err = loader.next().unwrap_err().to_string();
        assert!(err.contains("fewer than batch size 2"), "{err}");
        assert!(loader.next().is_err());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn epoch_order_is_a_deterministic_permutation() {
        let a = epoch_order(5, 2, 100);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(5, 2, 100));
        assert_ne!(a, epoch_order(5, 3, 100));
        assert_ne!(a, epoch_order(6, 2, 100));
        assert!(epoch_order(1, 1, 0).is_empty());
        assert_eq!(batches_per_epoch(10, 3), 3);
        assert_eq!(batches_per_epoch(10, 0), 0);
    }

    #[test]
    fn resumed_loader_matches_continued_one() {
        // Folder with random crops and flips and a corrupt image.
        let dir = sidecar_folder("resume", 9, 1);
        let o = DataOptions {
            random_flip: true,
            ..opts(&dir, 6)
        };
        let ds = Arc::new(Dataset::open(&o, 11).unwrap());
        let mut full = Loader::new(Arc::clone(&ds), 11, 3, Position::default(), 4);
        let batches: Vec<Batch> = (0..10).map(|_| full.next().unwrap()).collect();
        drop(full);
        let epochs: Vec<u64> = batches.iter().map(|b| b.epoch).collect();
        assert!(epochs.windows(2).all(|w| w[0] <= w[1]));
        assert!(*epochs.last().unwrap() >= 2);
        for k in [0, 1, 4] {
            let mut resumed = Loader::new(Arc::clone(&ds), 11, 3, batches[k].next, 1);
            for b in &batches[k + 1..] {
                assert_eq!(&resumed.next().unwrap(), b);
            }
        }
        let _ = fs::remove_dir_all(&dir);

        // Built-in dataset, mid-epoch resume.
        let o = DataOptions {
            builtin_size: 10,
            resolution: 8,
            ..DataOptions::default()
        };
        let ds = Arc::new(Dataset::open(&o, 2).unwrap());
        let mut full = Loader::new(Arc::clone(&ds), 2, 4, Position::default(), 4);
        let batches: Vec<Batch> = (0..6).map(|_| full.next().unwrap()).collect();
        assert_eq!(
            batches[0].next,
            Position {
                epoch: 0,
                cursor: 4
            }
        );
        assert_eq!(
            batches[1].next,
            Position {
                epoch: 1,
                cursor: 0
            }
        );
        assert_eq!(batches[2].epoch, 1);
        let mut resumed = Loader::new(Arc::clone(&ds), 2, 4, batches[2].next, 2);
        for b in &batches[3..] {
            assert_eq!(&resumed.next().unwrap(), b);
        }
        for b in &batches {
            for (k, &i) in b.indices.iter().enumerate() {
                assert_eq!(b.captions[k], ds.caption(i));
            }
        }
    }

    #[test]
    fn builtin_is_deterministic_and_matches_captions() {
        assert_eq!(builtin_caption(1, 5), builtin_caption(1, 5));
        assert_eq!(builtin_render(1, 5, 32), builtin_render(1, 5, 32));
        let captions: std::collections::HashSet<String> =
            (0..64).map(|i| builtin_caption(1, i)).collect();
        assert!(captions.len() > 20);
        let c = BuiltinExample {
            shape: 0,
            colour: 0,
            size: 0,
            position: 0,
            offset: [0.0, 0.0],
        };
        assert_eq!(c.caption(), "a small red circle on the left");
        let c = BuiltinExample {
            shape: 1,
            colour: 2,
            size: 1,
            position: 4,
            offset: [0.0, 0.0],
        };
        assert_eq!(c.caption(), "a large blue square in the center");

        let res = 48;
        let plane = res * res;
        let bg = BUILTIN_BACKGROUND.map(|v| v as f32 / 127.5 - 1.0);
        for i in 0..200 {
            let ex = builtin_example(9, i);
            let cap = ex.caption();
            let img = builtin_render(9, i, res);
            assert_eq!(img.len(), 3 * plane);
            let (colour_name, rgb) = BUILTIN_COLOURS[ex.colour];
            assert!(cap.contains(colour_name));
            let fg = rgb.map(|v| v as f32 / 127.5 - 1.0);
            let (mut sx, mut sy, mut count) = (0.0, 0.0, 0.0);
            for p in 0..plane {
                let px = [img[p], img[plane + p], img[2 * plane + p]];
                if px != bg {
                    assert_eq!(px, fg, "example {i}: '{cap}'");
                    sx += (p % res) as f64 + 0.5;
                    sy += (p / res) as f64 + 0.5;
                    count += 1.0;
                }
            }
            assert!(count > 0.0);
            let (cx, cy) = (sx / count / res as f64, sy / count / res as f64);
            let third = |v: f64| (v * 3.0) as usize;
            let expected = if cap.ends_with("on the left") {
                (0, 1)
            } else if cap.ends_with("on the right") {
                (2, 1)
            } else if cap.ends_with("at the top") {
                (1, 0)
            } else if cap.ends_with("at the bottom") {
                (1, 2)
            } else {
                assert!(cap.ends_with("in the center"));
                (1, 1)
            };
            assert_eq!((third(cx), third(cy)), expected, "example {i}: '{cap}'");
        }
        // Large shapes cover more pixels than small ones.
        let area = |size: usize| {
            let ex = BuiltinExample {
                shape: 0,
                colour: 1,
                size,
                position: 4,
                offset: [0.0, 0.0],
            };
            let img = ex.render(64);
            img[..64 * 64].iter().filter(|&&v| v != bg[0]).count()
        };
        assert!(area(1) > 3 * area(0));

        let o = DataOptions {
            builtin_size: 7,
            resolution: 16,
            random_flip: true,
            ..DataOptions::default()
        };
        let ds = Dataset::open(&o, 9).unwrap();
        assert!(ds.is_builtin());
        assert_eq!(ds.len(), 7);
        assert_eq!(ds.caption(3), builtin_caption(9, 3));
        assert_eq!(ds.load(3, 5).unwrap(), builtin_render(9, 3, 16));
        assert!(ds.load(7, 0).is_err());
    }

    #[test]
    fn select_keeps_n_examples() {
        let opts = DataOptions {
            builtin_size: 10,
            resolution: 8,
            ..Default::default()
        };
        let mut d = Dataset::open(&opts, 0).unwrap();
        let first = d.caption(0).to_string();
        d.select(4, 1);
        assert_eq!((d.len(), d.caption(0)), (4, first.as_str()));
        d.select(100, 1);
        assert_eq!(d.len(), 4);
    }
}
