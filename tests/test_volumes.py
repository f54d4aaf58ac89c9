"""Regional volumes measured from images, checked against the synthetic cohort's true volumes."""

import numpy as np
import pandas as pd
import pytest

from neuroar.config import load_config
from neuroar.data.nifti import read_volume
from neuroar.data.preprocess import preprocess_image
from neuroar.evaluate.volumes import (
    REGIONS,
    intensity_mixture,
    intensity_mixtures,
    regional_volumes,
    template_regions,
    true_volumes,
)


@pytest.fixture(scope="module")
def measured(cohort):
    """Measured and true volumes of every scan of the cohort, on the demo config's grid."""
    config = load_config("demo").data
    regions = template_regions(config)
    truth = pd.read_csv(cohort / "truth.csv", dtype={"subject_id": str, "session_id": str})
    rows = []
    for row in truth.to_dict("records"):
        name = f"{row['subject_id']}_{row['session_id']}_T1w.nii.gz"
        path = cohort / row["subject_id"] / row["session_id"] / "anat" / name
        volume_DHW, _ = preprocess_image(read_volume(path), config)
        rows.append({"subject_id": row["subject_id"], "age": row["age"],
                     **{f"measured_{k}": v for k, v in regional_volumes(volume_DHW, regions).items()},
                     **{f"true_{k}": v for k, v in true_volumes(row).items()}})
    return pd.DataFrame(rows)


def test_ventricle_volume_and_its_change_follow_the_truth(measured):
    relative_error = (measured["measured_ventricles"] / measured["true_ventricles"] - 1).abs()
    assert relative_error.mean() < 0.35
    assert np.corrcoef(measured["measured_ventricles"], measured["true_ventricles"])[0, 1] > 0.85
    change = first_to_last(measured)
    assert np.corrcoef(change["measured_ventricles"], change["true_ventricles"])[0, 1] > 0.8
    # Calibrated: the mean measured change is within a third of the mean true change.
    assert abs(change["measured_ventricles"].mean() / change["true_ventricles"].mean() - 1) < 0.35


def test_whole_brain_volume_follows_the_truth_and_shrinks_with_age(measured):
    relative_error = (measured["measured_whole_brain"] / measured["true_whole_brain"] - 1).abs()
    assert relative_error.mean() < 0.2
    assert np.corrcoef(measured["measured_whole_brain"], measured["true_whole_brain"])[0, 1] > 0.5
    assert (first_to_last(measured)["measured_whole_brain"] < 0).mean() > 0.7


def test_identical_images_have_identical_volumes_and_every_region_is_positive(measured, cohort):
    config = load_config("demo").data
    path = next(cohort.glob("sub-*/ses-*/anat/*_T1w.nii.gz"))
    volume_DHW, _ = preprocess_image(read_volume(path), config)
    first = regional_volumes(volume_DHW, template_regions(config))
    assert first == regional_volumes(volume_DHW.copy(), template_regions(config))
    assert set(first) == set(REGIONS) and all(v > 0 for v in first.values())


def test_the_histogram_mixture_recovers_known_components_and_agrees_with_scikit_learn():
    from sklearn.mixture import GaussianMixture

    rng = np.random.default_rng(0)
    weights, means, sds = np.array([0.25, 0.45, 0.3]), np.array([0.35, 0.7, 0.9]), np.array([0.08, 0.05, 0.03])
    component = rng.choice(3, 100_000, p=weights)
    values = rng.normal(means[component], sds[component])
    fitted_weights, fitted_means, fitted_variances = intensity_mixture(values)
    np.testing.assert_allclose(fitted_weights, weights, atol=0.01)
    np.testing.assert_allclose(fitted_means, means, atol=0.005)
    np.testing.assert_allclose(np.sqrt(fitted_variances), sds, atol=0.005)
    reference = GaussianMixture(3, means_init=means[:, None], tol=1e-8, max_iter=2000).fit(values[:, None])
    np.testing.assert_allclose(fitted_means, reference.means_[:, 0], atol=0.002)


def test_mixtures_fitted_together_stop_each_where_it_would_alone():
    """Three samples whose EM converges after different numbers of iterations: fitted side by side, each gives what
    it gives alone (an EM that ran on for the slowest, or stopped with the fastest, would not)."""
    rng = np.random.default_rng(1)
    samples = []
    for means, sds in (((0.3, 0.6, 0.9), (0.05, 0.05, 0.05)), ((0.35, 0.5, 0.62), (0.08, 0.06, 0.05)),
                       ((0.2, 0.7, 0.75), (0.04, 0.05, 0.03))):
        component = rng.choice(3, 30_000, p=[0.3, 0.4, 0.3])
        samples.append(rng.normal(np.array(means)[component], np.array(sds)[component]))
    iterations = [intensity_mixture(v, max_iter=n) for v in samples for n in (20, 200)]
    assert not all(np.allclose(a, b) for a, b in zip(iterations[::2], iterations[1::2]))  # still moving at 20

    together = intensity_mixtures(samples)

    for values, fitted in zip(samples, together):
        for mine, alone in zip(fitted, intensity_mixture(values)):
            np.testing.assert_allclose(mine, alone, rtol=1e-12)


def first_to_last(measured: pd.DataFrame) -> pd.DataFrame:
    ordered = measured.sort_values("age").groupby("subject_id")
    return ordered.last(numeric_only=True) - ordered.first(numeric_only=True)


def test_the_evaluation_reports_the_predicted_change_beside_the_true_one():
    """Mean and spread of each model's predicted change over pairs, and the truth's, in the table and the CSV:
    a change that is sampling noise shows as a wide spread around 0; a model that changes nothing has no r."""
    from neuroar.evaluate.compare import summarize, summary_markdown

    true_P = np.array([1.0, 2.0, 4.0, 9.0])
    rows = []
    still_P = np.array([0.01, -0.01, 0.02, 0.0])  # decoding noise of a model that changes nothing
    for model, predicted_P in (("copy", np.zeros(4)), ("noisy", np.array([-6.0, 5.0, -1.0, 3.0])),
                               ("still", still_P)):
        for p, (true, predicted) in enumerate(zip(true_P, predicted_P)):
            rows.append({"label": model, "model": model, "variant": "plain", "pair": p, "subject_id": f"s{p}",
                         "years": 1.0 + p, "psnr": 20.0 + p, "ssim": 0.9,
                         "mae": 0.1, **{f"true_change_{r}": true for r in REGIONS},
                         **{f"predicted_change_{r}": predicted for r in REGIONS}})
    per_pair = pd.DataFrame(rows)
    summary = summarize(per_pair, pd.DataFrame(columns=["label"]), "ventricles")
    noisy = summary.set_index("model").loc["noisy"]
    assert noisy["ventricles_change_mean"] == pytest.approx(0.25)
    assert noisy["ventricles_change_std"] == pytest.approx(np.std([-6.0, 5.0, -1.0, 3.0], ddof=1))
    assert noisy["ventricles_true_change_mean"] == pytest.approx(4.0)
    assert noisy["ventricles_true_change_std"] == pytest.approx(np.std(true_P, ddof=1))
    assert noisy["ventricles_change_r"] == pytest.approx(np.corrcoef([-6.0, 5.0, -1.0, 3.0], true_P)[0, 1])
    # A correlation of decoding noise with the truth (here -0.07) is no measurement: undefined, as copy's.
    assert np.isnan(summary.set_index("model").loc["still", "ventricles_change_r"])
    table = summary_markdown(summary, per_pair, "test", chosen=False)
    assert f"| +0.25 ± {np.std([-6.0, 5.0, -1.0, 3.0], ddof=1):.2f} |" in table
    assert "| +0.00 ± 0.00 |" in table
    assert f"true: +4.00 ± {np.std(true_P, ddof=1):.2f} mL" in table
