"""The report columns that `analyze_matrix` produces, each with a one-sentence meaning.

Why a table: the README's column reference, the Arrow schema of later reports and the
tests all read this one list, so a column cannot be added in one place and forgotten in
another. Names follow WeightWatcher 0.7.7 wherever the quantity is WeightWatcher's.
"""

from __future__ import annotations

# HTSR's reading of alpha: below over-trained, above under-trained (the `warning` column,
# the gate's default alpha_range, the HTML page's guide lines).
OVER_TRAINED, UNDER_TRAINED = 2.0, 6.0

# name -> (arrow-ish type, meaning). Types: int, float, str, list<float>, list<entry>.
COLUMNS: dict[str, tuple[str, str]] = {
    "N": ("int", "Larger dimension of W (WeightWatcher orients W so that N >= M)."),
    "M": ("int", "Smaller dimension of W: the number of eigenvalues of its Gram matrix."),
    "Q": ("float", "Aspect ratio N / M >= 1, the Marchenko-Pastur shape parameter."),
    "num_evals": ("int", "Number of eigenvalues in the ESD (= M)."),
    "lambda_max": ("float", "Largest eigenvalue of W^T W (squared spectral norm of W)."),
    "log_spectral_norm": ("float", "log10(lambda_max)."),
    "norm": ("float", "Sum of all eigenvalues: the squared Frobenius norm of W."),
    "log_norm": ("float", "log10(norm)."),
    "stable_rank": ("float", "norm / lambda_max: how many directions carry the energy."),
    "alpha": (
        "float",
        "HTSR power-law exponent of the ESD tail (continuous MLE at the KS-best xmin); "
        f"about 2 is well trained, below {OVER_TRAINED:g} over-trained, above "
        f"{UNDER_TRAINED:g} under-trained.",
    ),
    "xmin": ("float", "Start of the power-law tail chosen by the smallest KS distance."),
    "D": ("float", "Kolmogorov-Smirnov distance of the fitted power law to the tail."),
    "sigma": ("float", "Standard error of alpha: (alpha - 1) / sqrt(tail size)."),
    "num_pl_spikes": ("int", "Eigenvalues in the power-law tail (lambda >= xmin)."),
    "alpha_weighted": ("float", "alpha * log10(lambda_max), WeightWatcher's alpha-hat."),
    "log_alpha_norm": ("float", "log10 of the sum of lambda^alpha (Schatten alpha-norm)."),
    "warning": (
        "str",
        f"'over-trained' if alpha < {OVER_TRAINED:g}, 'under-trained' if alpha > "
        f"{UNDER_TRAINED:g}, else empty.",
    ),
    "num_spikes": (
        "int",
        "Eigenvalues of W above its fitted Marchenko-Pastur bulk edge plus the "
        "Tracy-Widom allowance: learned signal.",
    ),
    "sigma_mp": ("float", "Fitted MP scale of W's ESD (in units where the mean eigenvalue is 1)."),
    "mp_softrank": (
        "float",
        "MP bulk edge / lambda_max, both rescaled: small means strong spikes.",
    ),
    "bulk_max": ("float", "Upper MP bulk edge of W's ESD, in the original eigenvalue units."),
    "bulk_min": ("float", "Lower MP bulk edge of W's ESD, in the original eigenvalue units."),
    "rand_num_spikes": (
        "int",
        "Correlation traps: eigenvalues of the element-shuffled W above its own fitted "
        "MP bulk edge plus the Tracy-Widom allowance.",
    ),
    "rand_sigma_mp": ("float", "Fitted MP scale of the shuffled matrix's ESD."),
    "rand_mp_softrank": ("float", "Shuffled matrix's MP bulk edge / its largest eigenvalue."),
    "rand_bulk_max": (
        "float",
        "Upper MP bulk edge of the shuffled matrix's ESD, in the original eigenvalue units.",
    ),
    "max_rand_eval": ("float", "Largest eigenvalue of the shuffled matrix."),
    "rand_distance": (
        "float",
        "Jensen-Shannon distance between the sorted eigenvalues of W and of the shuffled W "
        "(WeightWatcher uses a second shuffle; we use the same one).",
    ),
    "trap_ratio": (
        "float",
        "max_rand_eval / rand_bulk_max: how far the largest shuffled eigenvalue sits beyond "
        "the shuffled bulk edge. At most 1 means no trap; the anti-grokking paper's traps "
        "are lambda >> lambda+, while rand_num_spikes counts from the edge plus the "
        "Tracy-Widom allowance (a trap of ratio 1.08 counts).",
    ),
    "ww_softrank": ("float", "max_rand_eval / lambda_max."),
    "ww_maxdist": ("float", "lambda_max - max_rand_eval."),
    "trap_evals": (
        "list<float>",
        "The shuffled matrix's eigenvalues beyond its bulk edge (the traps), largest first.",
    ),
    "trap_ratios": (
        "list<float>",
        "Each trap's own ratio to the shuffled bulk edge (trap_evals / rand_bulk_max), in "
        "the same order: filter strong traps with it.",
    ),
    "trap_entries": (
        "list<entry>",
        "The largest-|w| entries of W (row, col, value in W's own layout), one per trap: "
        "large isolated entries are what survive shuffling as traps.",
    ),
    "entry_kurtosis": (
        "float",
        "Excess kurtosis of W's entries: near 0 for Gaussian entries, large when the "
        "entries themselves are heavy-tailed (traps then need no correlation at all).",
    ),
    "max_abs_entry": ("float", "Largest |w|, beside the traps it may cause."),
    "rand_route": ("str", "How the shuffled spectrum was computed: 'full' or 'topk'."),
    "backend": ("str", "Array backend that computed the eigenvalues (numpy, torch, cuda, cupy)."),
    "seed": ("int", "Run seed; the shuffle generator is seeded from (seed, matrix_id)."),
    "matrix_id": ("str", "Identifier of the matrix that, with seed, fixes its shuffle."),
    "status": ("str", "'ok', 'skipped' (not analysable, see reason) or 'error'."),
    "reason": ("str", "Why status is not 'ok'; empty when it is, or a note on partial results."),
}

COLUMN_NAMES: tuple[str, ...] = tuple(COLUMNS)
