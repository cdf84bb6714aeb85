//! Folders written by today's libraries load and run: a tiny pipeline saved
//! by diffusers 0.42 and transformers 5.25 (tests/fixtures/current_versions,
//! written by tests/fixtures/generate_current_versions.py) with its
//! reference outputs. transformers 5 saves the text encoder without the
//! `text_model.` prefix and the tokenizer as tokenizer.json only.

use difftrain::io::{HostTensor, TensorFile};
use difftrain::models::forward::{text_encoder_forward, unet_forward};
use difftrain::models::PipelineDir;
use difftrain::ops::testing::gpu;
use difftrain::train::scheduler::{BetaSchedule, NoiseSchedule};
mod common;

use common::{fixture, rel_l2};

#[test]
fn pipeline_of_current_libraries_matches_their_outputs() {
    let dir = fixture("current_versions");
    let p = PipelineDir::open(&dir).unwrap();
    let expected = TensorFile::read(&dir.join("expected.safetensors")).unwrap();

    let prompts = [
        "a red circle on the left",
        "",
        "A small BLUE square, in the center!",
    ];
    let ids: Vec<f32> = p
        .tokenizer
        .encode_batch(&prompts)
        .unwrap()
        .into_iter()
        .flatten()
        .map(|i| i as f32)
        .collect();
    assert_eq!(ids, expected.get("input_ids").unwrap().values, "token ids");

    let ids = HostTensor::f32(&[3, 77], ids);
    let (hidden, _) = text_encoder_forward(gpu(), &dir.join("text_encoder"), &ids, 0).unwrap();
    let err = rel_l2(
        &hidden.values,
        &expected.get("last_hidden_state").unwrap().values,
    );
    println!("text encoder (no text_model. prefix): relative L2 {err:.2e}");
    assert!(err < 1e-4, "{err:.2e}");

    let mut inputs = TensorFile::new(&dir);
    for (name, key) in [
        ("sample", "unet_sample"),
        ("timestep", "unet_timestep"),
        ("encoder_hidden_states", "unet_ehs"),
    ] {
        inputs.insert(name, expected.get(key).unwrap().clone());
    }
    let out = unet_forward(gpu(), &dir.join("unet"), &inputs, false).unwrap();
    let err = rel_l2(
        &out.tensors.get("sample").unwrap().values,
        &expected.get("unet_out").unwrap().values,
    );
    println!("unet: relative L2 {err:.2e}");
    assert!(err < 1e-4, "{err:.2e}");
}

#[test]
fn scheduler_configs_of_every_class_give_the_schedule() {
    let dir = fixture("current_versions");
    for sub in ["scheduler", "scheduler_pndm", "scheduler_euler"] {
        let s = NoiseSchedule::from_diffusers_json(&dir.join(sub).join("scheduler_config.json"))
            .unwrap_or_else(|e| panic!("{sub}: {e}"));
        assert_eq!(s.beta_schedule, BetaSchedule::ScaledLinear, "{sub}");
        assert_eq!((s.beta_start, s.beta_end), (0.00085, 0.012), "{sub}");
        assert_eq!(s.num_train_timesteps, 1000, "{sub}");
    }
    // A value difftrain does not support names its key.
    let tmp = std::env::temp_dir().join(format!("difftrain-sched-{}.json", std::process::id()));
    for (json, key) in [
        (r#"{"beta_schedule": "exponential"}"#, "beta_schedule"),
        (r#"{"prediction_type": "flow"}"#, "prediction_type"),
        (r#"{"num_train_timesteps": 1}"#, "num_train_timesteps"),
    ] {
        std::fs::write(&tmp, json).unwrap();
        let e = NoiseSchedule::from_diffusers_json(&tmp)
            .unwrap_err()
            .to_string();
        assert!(e.contains(key), "{json}: {e}");
    }
    let _ = std::fs::remove_file(&tmp);
}

/// Training starts from the folder (its UNet, VAE, text encoder, tokenizer
/// and scheduler) and writes a complete pipeline.
#[test]
fn trains_from_a_current_pipeline_folder() {
    use difftrain::train::config::Config;
    use difftrain::train::trainer::train;
    let dir = fixture("current_versions");
    let out = std::env::temp_dir().join(format!("difftrain-current-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let sets: Vec<String> = vec![
        format!(
            "model.pretrained_model_name_or_path={:?}",
            dir.display().to_string()
        ),
        format!("train.output_dir={:?}", out.display().to_string()),
        "train.max_train_steps=2".into(),
        "train.train_batch_size=2".into(),
        "train.seed=1".into(),
        "data.resolution=16".into(),
        "data.builtin_size=4".into(),
        "model.prediction_type=\"v_prediction\"".into(),
        "train.dream_training=true".into(),
    ];
    let config = Config::for_training(None, &sets).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let s = train(gpu(), &config, &stop, &mut |_| {}).unwrap();
    assert_eq!(s.steps, 2);
    assert!(s.last_loss.unwrap().is_finite());
    let p = PipelineDir::open(&out).unwrap();
    assert_eq!(p.unet.config.block_out_channels, [8, 16]);
    let _ = std::fs::remove_dir_all(&out);
}
