"""HF <-> Megatron dist checkpoint <-> .nemo on the tiny random Llama: bit-exact round trips, verify, bad input."""

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nemotune.converters import checkpoint
from nemotune.converters.formats import checkpoint as checkpoint_files
from nemotune.converters.convert import main as convert_main
from nemotune.converters.formats.hf_config import ModelConfigError, load_hf_config
from nemotune.converters.tiny_model import write_tiny_llama


def hf_tensors(path: Path) -> dict:
    state = {}
    for shard in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    return state


def assert_bit_exact(a: Path, b: Path):
    sa, sb = hf_tensors(a), hf_tensors(b)
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name


def leftovers(parent: Path) -> list:
    return [p.name for p in parent.iterdir() if ".partial-" in p.name]


@pytest.fixture(scope="module")
def nemo_file(sharded_tiny_hf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("nemo") / "tiny.nemo"
    assert convert_main(["hf-to-nemo", "--hf", str(sharded_tiny_hf), "--out", str(out), "--no-progress"]) == 0
    return out


def test_hf_megatron_hf_bit_exact(sharded_tiny_hf, sharded_tiny_mcore, tmp_path):
    assert (sharded_tiny_mcore / "weights" / "metadata.json").is_file()
    assert load_hf_config(sharded_tiny_mcore)["num_hidden_layers"] == 2
    out = tmp_path / "back"
    assert convert_main(["megatron-to-hf", "--ckpt", str(sharded_tiny_mcore), "--out", str(out),
                         "--max-shard-size", "200KB", "--no-progress"]) == 0
    assert_bit_exact(sharded_tiny_hf, out)
    assert (out / checkpoint_files.INDEX_NAME).is_file()
    assert json.loads((out / "config.json").read_text()) == json.loads((sharded_tiny_hf / "config.json").read_text())
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).is_file() == (sharded_tiny_hf / name).is_file(), name


def test_hf_nemo_hf_bit_exact_and_layout(sharded_tiny_hf, nemo_file, tmp_path):
    import yaml

    with tarfile.open(nemo_file) as archive:
        names = set(archive.getnames())
        cfg = yaml.safe_load(archive.extractfile("./model_config.yaml"))
    assert {"./model_config.yaml", "./model_weights/metadata.json", "./hf/config.json"} <= names
    assert cfg["mcore_gpt"] is True and cfg["num_query_groups"] == 2 and cfg["ffn_hidden_size"] == 176
    from megatron.core import dist_checkpointing

    with checkpoint_files.open_megatron_checkpoint(nemo_file) as (_, weights, prefix, _aux):
        keys = set(dist_checkpointing.load_tensors_metadata(str(weights)))
    # NeMo's names: prefixed, layers stacked, TE layer-norm names
    assert prefix == "model."
    assert {"model.decoder.layers.self_attention.linear_qkv.weight", "model.embedding.word_embeddings.weight",
            "model.decoder.layers.self_attention.linear_qkv.layer_norm_weight",
            "model.decoder.layers.mlp.linear_fc1.layer_norm_weight", "model.output_layer.weight"} <= keys
    out = tmp_path / "back"
    assert convert_main(["nemo-to-hf", "--nemo", str(nemo_file), "--out", str(out), "--no-progress"]) == 0
    assert_bit_exact(sharded_tiny_hf, out)


def test_nemo_without_hf_folder_uses_model_config(sharded_tiny_hf, nemo_file, tmp_path):
    """A NeMo-written .nemo has no hf/ folder: the HF config is rebuilt from model_config.yaml."""
    root = tmp_path / "extracted"
    checkpoint_files.safe_extract(nemo_file, root)
    import shutil

    shutil.rmtree(root / "hf")
    out = checkpoint.megatron_to_hf(root, tmp_path / "back", progress=False)
    assert_bit_exact(sharded_tiny_hf, out)
    rebuilt = load_hf_config(out)
    original = load_hf_config(sharded_tiny_hf)
    for key in ("hidden_size", "num_key_value_heads", "head_dim", "vocab_size", "rope_theta", "rope_scaling"):
        assert rebuilt[key] == original[key], key


def test_verify_passes_and_fails(sharded_tiny_hf, sharded_tiny_mcore, nemo_file, tmp_path, capsys):
    assert convert_main(["verify", "--hf", str(sharded_tiny_hf), "--ckpt", str(sharded_tiny_mcore)]) == 0
    assert "max |logit diff|" in capsys.readouterr().out
    assert checkpoint.verify(sharded_tiny_hf, nemo_file) <= 1e-5
    other = write_tiny_llama(tmp_path / "other", seed=1)
    assert convert_main(["verify", "--hf", str(other), "--ckpt", str(sharded_tiny_mcore)]) == 1


def test_tied_embeddings_round_trip(tmp_path):
    hf = write_tiny_llama(tmp_path / "tied", seed=3, tie_word_embeddings=True)
    assert "lm_head.weight" not in hf_tensors(hf)
    meg = checkpoint.hf_to_megatron(hf, tmp_path / "meg", progress=False)
    assert checkpoint.verify(hf, meg) <= 1e-5
    back = checkpoint.megatron_to_hf(meg, tmp_path / "back", progress=False)
    assert_bit_exact(hf, back)


def test_truncated_shard_fails_cleanly(sharded_tiny_hf, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(sharded_tiny_hf, broken)
    shard = sorted(broken.glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    out = tmp_path / "out"
    with pytest.raises(checkpoint_files.ConversionError, match="truncated"):
        checkpoint.hf_to_megatron(broken, out, progress=False)
    assert not out.exists() and leftovers(tmp_path) == []
    assert convert_main(["hf-to-nemo", "--hf", str(broken), "--out", str(tmp_path / "x.nemo")]) == 2
    assert not (tmp_path / "x.nemo").exists() and leftovers(tmp_path) == []


def test_unsupported_architecture_and_shape_mismatch(sharded_tiny_hf, tmp_path):
    import shutil

    for name, edit, error, message in (
        ("mistral", {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral"}, ModelConfigError,
         "unsupported architecture"),
        ("shapes", {"intermediate_size": 192}, checkpoint_files.ConversionError, "does not match its config"),
    ):
        bad = tmp_path / name
        shutil.copytree(sharded_tiny_hf, bad)
        config = json.loads((bad / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps({**config, **edit}))
        with pytest.raises(error, match=message):
            checkpoint.hf_to_megatron(bad, tmp_path / f"out-{name}", progress=False)
        assert not (tmp_path / f"out-{name}").exists()
    assert leftovers(tmp_path) == []


def test_nemo_with_parent_path_member_is_refused(tmp_path):
    evil = tmp_path / "evil.nemo"
    with tarfile.open(evil, "w:") as archive:
        data = b"mcore_gpt: true\n"
        info = tarfile.TarInfo("../escaped.yaml")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    with pytest.raises(checkpoint_files.ConversionError, match="unsafe"):
        checkpoint.megatron_to_hf(evil, tmp_path / "out", progress=False)
    assert not (tmp_path.parent / "escaped.yaml").exists() and not (tmp_path / "out").exists()


def test_existing_output_is_not_overwritten(sharded_tiny_hf, sharded_tiny_mcore):
    with pytest.raises(checkpoint_files.ConversionError, match="already exists"):
        checkpoint.hf_to_megatron(sharded_tiny_hf, sharded_tiny_mcore, progress=False)
