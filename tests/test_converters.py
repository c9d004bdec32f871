"""`phenoscale shards rxrx1|rxrx3|jump|folder` on the real fields in ../shared/data/images."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import tifffile
from PIL import Image

from datamodules import read_manifest
from datamodules.converters import jump_sites, parse_channel_map, read_site, rxrx1_sites
from datamodules.samples import iter_shard
from phenoscale.cli import main as cli
from real_field import PEDIATRIC_FIELD, PEDIATRIC_STAINS, pediatric_field
from run_helpers import fail_on_bad

CPJUMP1 = "images/jump_cpjump1_BR00117006_A01_f01"
HUMAN = "images/cellprofiler_ExampleHuman"


def shard_images(out: Path) -> dict[str, np.ndarray]:
    """Every sample's pixels, read back through the training reader."""
    return {s.key: s.image() for shard in sorted(out.glob("*.tar")) for s in iter_shard(str(shard), 1, fail_on_bad)}


@pytest.fixture(scope="module")
def phenix_planes(shared_data: Path) -> list[np.ndarray]:
    return list(pediatric_field(shared_data))


def test_jump_phenix_channel_map_from_load_data(tmp_path, shared_data, phenix_planes):
    out = tmp_path / "out"
    assert cli(["shards", "jump", str(shared_data / PEDIATRIC_FIELD), str(out), "--workers", "1"]) == 0
    manifest = read_manifest(out)
    row = manifest.row(0, named=True)
    assert (row["plate"], row["well"], row["site"], row["dtype"]) == ("BR00143976", "C03", 3, "uint16")
    assert row["channels"] == PEDIATRIC_STAINS
    image = shard_images(out)[row["key"]]
    assert image.shape == (6, 1080, 1080)
    for index in range(6):  # ch{i} at index i-1: the map says which stain each index is
        np.testing.assert_array_equal(image[index], phenix_planes[index])


def test_jump_channel_map_option_and_no_guessing(tmp_path, shared_data):
    bare = tmp_path / "bare"  # the TIFFs without their load_data table
    bare.mkdir()
    for tiff in (shared_data / PEDIATRIC_FIELD).glob("*.tiff"):
        (bare / tiff.name).symlink_to(tiff)
    with pytest.raises(ValueError, match="never assumed"):
        jump_sites(bare)
    assert (
        cli(
            [
                "shards",
                "jump",
                str(bare),
                str(tmp_path / "out"),
                "--workers",
                "1",
                "--plate",
                "BR00143976",
                "--channel-map",
                "5=DNA,2=ER",
            ]
        )
        == 0
    )
    manifest = read_manifest(tmp_path / "out")
    assert manifest["channels"][0].to_list() == ["ER", "DNA"]  # ordered by channel number
    image = next(iter(shard_images(tmp_path / "out").values()))
    np.testing.assert_array_equal(image[1], tifffile.imread(bare / "r03c03f03p01-ch5sk1fk1fl1.tiff"))


def test_cpjump1_missing_channels_error_then_allow_missing(tmp_path, shared_data, capsys):
    src = shared_data / CPJUMP1
    assert cli(["shards", "jump", str(src), str(tmp_path / "strict"), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "site 'BR00117006_A01_1'" in err and "r01c01f01p01-ch1sk1fk1fl1.tiff" in err and "ch4" in err
    assert not list((tmp_path / "strict").glob("*.tar"))  # nothing written under a final name

    # perturbations from the real JUMP-Target ORF plate map (BR00117006 is an ORF plate)
    target = shared_data / "metadata" / "jump_target"
    wells = (
        pl.read_csv(target / "JUMP-Target-1_orf_platemap.tsv", separator="\t")
        .join(pl.read_csv(target / "JUMP-Target-1_orf_metadata.tsv", separator="\t"), on="broad_sample")
        .select(
            pl.col("well_position").alias("well"),
            pl.col("gene").alias("perturbation"),
            pl.lit("orf").alias("perturbation_type"),
            (pl.col("control_type").fill_null("") == "negcon").alias("is_control"),
            pl.lit("A549").alias("cell_type"),
        )
    )
    wells.write_csv(tmp_path / "wells.csv")
    out = tmp_path / "lenient"
    assert (
        cli(
            [
                "shards",
                "jump",
                str(src),
                str(out),
                "--workers",
                "2",
                "--allow-missing",
                "--well-metadata",
                str(tmp_path / "wells.csv"),
            ]
        )
        == 0
    )
    row = read_manifest(out).row(0, named=True)
    assert row["channels"] == ["AGP", "RNA", "DNA"]  # ch2, ch3, ch5 present; names from the parquet
    assert (row["perturbation"], row["perturbation_type"], row["is_control"], row["cell_type"]) == (
        "KCNN1",
        "orf",
        False,
        "A549",
    )
    image = shard_images(out)[row["key"]]
    for index, ch in enumerate([2, 3, 5]):
        np.testing.assert_array_equal(image[index], tifffile.imread(src / f"r01c01f01p01-ch{ch}sk1fk1fl1.tiff"))


def test_folder_layout_uint8_example_human(tmp_path, shared_data):
    src = shared_data / HUMAN
    files = sorted(src.glob("*.tif"))
    table = pl.DataFrame(
        {
            "Metadata_Plate": ["AS_09125"],
            "Metadata_Well": ["D03"],
            "Metadata_Site": ["0"],
            "perturbation": ["untreated"],
            "is_control": ["True"],
            **{f"FileName_{stain}": [f.name] for stain, f in zip(["DNA", "PH3", "Cell"], files)},
            **{f"PathName_{stain}": [str(src)] for stain in ["DNA", "PH3", "Cell"]},
        }
    )
    table.write_csv(tmp_path / "sites.csv")
    assert cli(["shards", "folder", str(tmp_path / "sites.csv"), str(tmp_path / "out"), "--workers", "1"]) == 0
    row = read_manifest(tmp_path / "out").row(0, named=True)
    assert row["channels"] == ["DNA", "PH3", "Cell"] and row["dtype"] == "uint8"
    assert (row["key"], row["experiment"], row["is_control"], row["perturbation_type"]) == (
        "AS_09125_D03_0",
        "AS_09125",
        True,
        "unknown",
    )
    image = shard_images(tmp_path / "out")["AS_09125_D03_0"]
    np.testing.assert_array_equal(image, np.stack([tifffile.imread(f) for f in files]))


@pytest.fixture(scope="module")
def rxrx1_folder(tmp_path_factory, phenix_planes) -> Path:
    """An RxRx1-layout folder built from the real field: 8-bit PNG per channel, 2 wells x 2 sites."""
    root = tmp_path_factory.mktemp("rxrx1")
    planes8 = [(p >> 8).astype(np.uint8) for p in phenix_planes]  # test input only: 16 -> 8 bit
    rows = []
    wells = [("B02", "s21721", "treatment"), ("B03", "EMPTY", "negative_control")]
    for w, (well, sirna, well_type) in enumerate(wells):
        for site in (1, 2):
            folder = root / "HEPG2-01" / "Plate1"
            folder.mkdir(parents=True, exist_ok=True)
            top, left = 512 * (site - 1), 512 * w
            for ch in range(6):
                plane = planes8[ch][top : top + 512, left : left + 512]
                Image.fromarray(plane).save(folder / f"{well}_s{site}_w{ch + 1}.png")
            rows.append(
                dict(
                    site_id=f"HEPG2-01_1_{well}_{site}",
                    well_id=f"HEPG2-01_1_{well}",
                    cell_type="HEPG2",
                    dataset="train",
                    experiment="HEPG2-01",
                    plate=1,
                    well=well,
                    site=site,
                    well_type=well_type,
                    sirna=sirna,
                    sirna_id=w,
                )
            )
    pl.DataFrame(rows).write_csv(root / "metadata.csv")
    return root


def test_rxrx1_layout_round_trip_and_controls(tmp_path, rxrx1_folder):
    out = tmp_path / "out"
    assert cli(["shards", "rxrx1", str(rxrx1_folder), str(out), "--workers", "2", "--max-shard-mb", "2"]) == 0
    manifest = read_manifest(out)
    assert manifest.height == 4 and manifest["shard"].n_unique() == 4  # 1.5 MB sites, 2 MB shards
    assert manifest["channels"][0].to_list() == ["Hoechst", "ConA", "Phalloidin", "Syto14", "MitoTracker", "WGA"]
    controls = manifest.filter(pl.col("is_control"))
    assert controls["well"].to_list() == ["B03", "B03"] and set(controls["perturbation_type"]) == {"control"}
    assert manifest.filter(~pl.col("is_control"))["perturbation"].to_list() == ["s21721", "s21721"]
    assert manifest["well_type"].to_list()[:1] == ["treatment"]  # RxRx1 extras kept
    images = shard_images(out)
    for key in manifest["key"]:
        row = manifest.filter(pl.col("key") == key).row(0, named=True)
        plate = rxrx1_folder / "HEPG2-01" / "Plate1"
        expected = np.stack(
            [np.asarray(Image.open(plate / f"{row['well']}_s{row['site']}_w{c}.png")) for c in range(1, 7)]
        )
        assert images[key].dtype == np.uint8
        np.testing.assert_array_equal(images[key], expected)


def test_rxrx1_missing_file_named_or_skipped(tmp_path, rxrx1_folder):
    broken = tmp_path / "rxrx1"
    shutil.copytree(rxrx1_folder, broken)
    (broken / "HEPG2-01" / "Plate1" / "B03_s2_w4.png").unlink()
    assert cli(["shards", "rxrx1", str(broken), str(tmp_path / "a"), "--workers", "1"]) == 2
    assert cli(["shards", "rxrx1", str(broken), str(tmp_path / "b"), "--workers", "1", "--allow-missing"]) == 0
    row = read_manifest(tmp_path / "b").filter(pl.col("key") == "HEPG2-01_1_B03_2").row(0, named=True)
    assert row["channels"] == ["Hoechst", "ConA", "Phalloidin", "MitoTracker", "WGA"]
    sites = rxrx1_sites(broken).filter(pl.col("key") == "HEPG2-01_1_B03_2")
    with pytest.raises(ValueError, match=r"site 'HEPG2-01_1_B03_2': missing channel files \[.*B03_s2_w4.png'\]"):
        read_site((sites["key"][0], sites["files"][0].to_list(), sites["channels"][0].to_list(), False))


def test_rxrx3_sixteen_bit_png(tmp_path, phenix_planes):
    folder = tmp_path / "src" / "gene-001" / "Plate3"
    folder.mkdir(parents=True)
    rows = []
    wells = [("AA02", "RPLP2", "RPLP2_guide_4"), ("AB03", "EMPTY_control", "EMPTY_control")]
    for w, (address, gene, treatment) in enumerate(wells):
        for ch in range(6):
            plane = phenix_planes[ch][:300, 300 * w : 300 * (w + 1)]
            Image.fromarray(plane).save(folder / f"{address}_s1_w{ch + 1}.png")
        rows.append(
            dict(
                well_id=f"gene-001_3_{address}",
                experiment_name="gene-001",
                plate=3,
                address=address,
                gene=gene,
                treatment=treatment,
                SMILES=None,
                concentration=None,
                perturbation_type="CRISPR",
                cell_type="HUVEC",
            )
        )
    pl.DataFrame(rows).write_csv(tmp_path / "src" / "metadata.csv")
    assert cli(["shards", "rxrx3", str(tmp_path / "src"), str(tmp_path / "out"), "--workers", "1"]) == 0
    manifest = read_manifest(tmp_path / "out")
    assert manifest["perturbation"].to_list() == ["RPLP2", "EMPTY_control"]
    assert manifest["is_control"].to_list() == [False, True]
    assert manifest["perturbation_type"].to_list() == ["gene", "control"]
    image = shard_images(tmp_path / "out")["gene-001_3_AA02_1"]
    assert image.dtype == np.uint16
    np.testing.assert_array_equal(image, np.stack([p[:300, :300] for p in phenix_planes]))


def test_parse_channel_map():
    assert parse_channel_map("1=Brightfield, 2=ER") == {1: "Brightfield", 2: "ER"}
    for bad in ["", "1:DNA", "1=DNA,1=ER", "1=DNA,2=DNA"]:
        with pytest.raises(ValueError):
            parse_channel_map(bad)


def stripes_sites(src: str, channel_map: dict[int, str] | None = None, plate: str | None = None) -> pl.DataFrame:
    """A toy layout registered from this file: SRC/<well>_<stain>.png, one site per well."""
    files = sorted(Path(src).glob("*.png"))
    stains = channel_map or {i + 1: s for i, s in enumerate(sorted({f.stem.split("_")[1] for f in files}))}
    wells = sorted({f.stem.split("_")[0] for f in files})
    return pl.DataFrame(
        {
            "key": [f"{plate}_{w}" for w in wells],
            "experiment": plate,
            "plate": plate,
            "well": wells,
            "site": 1,
            "perturbation": "unknown",
            "perturbation_type": "unknown",
            "is_control": False,
            "cell_type": "unknown",
            "channels": [list(stains.values())] * len(wells),
            "files": [[str(Path(src) / f"{w}_{s}.png") for s in stains.values()] for w in wells],
        }
    )


def test_a_converter_registered_outside_the_package_is_a_shards_subcommand(tmp_path, phenix_planes):
    from datamodules.converters import Converter, ConverterOption, register_converter

    register_converter(
        Converter(
            "stripes", stripes_sites, "toy: <well>_<stain>.png", options=(ConverterOption("plate", "plate name"),)
        )
    )
    src = tmp_path / "src"
    src.mkdir()
    planes = {"DNA": phenix_planes[0][:64, :64], "ER": phenix_planes[1][:64, :64]}
    for well in ("A01", "B02"):
        for stain, plane in planes.items():
            Image.fromarray(plane).save(src / f"{well}_{stain}.png")
    out = tmp_path / "out"
    assert cli(["shards", "stripes", str(src), str(out), "--plate", "P1", "--workers", "1"]) == 0
    manifest = read_manifest(out)
    assert manifest["key"].to_list() == ["P1_A01", "P1_B02"] and manifest["channels"][0].to_list() == ["DNA", "ER"]
    image = shard_images(out)["P1_B02"]
    np.testing.assert_array_equal(image, np.stack(list(planes.values())))
