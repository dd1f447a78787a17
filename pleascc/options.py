"""The merge's choices and defaults, shared by ``pleascc.merge`` and ``pleascc merge``.

Apart from ``pleascc.api`` because the command line parses its arguments
before it imports torch (``--help`` stays instant); this module imports nothing.
"""

# method -> (matcher, how layers are refitted: PLeaS least squares, RegMean, or not at all)
METHODS = {"pleas": ("hungarian", "least-squares"), "permute": ("hungarian", None), "average": ("identity", None),
           "zipit": ("zipit", None), "regmean": ("identity", "regmean")}
LABELS = ("shared", "separate")
MATCHINGS = ("activation", "weight")
WIDTH_SEARCHES = ("greedy", "uniform", "stages")  # see passes.budget.WIDTHS
LEAST_SQUARES = ("sequential", "one-pass")  # fit inputs: the merged model's own, or the originals' features
POSITIONS = 64  # spatial positions (or tokens) per sample the statistics read (see stats.sampled_positions)
ZIP_ALPHA = 0.3
ZIP_BETA = 0.125
REGMEAN_ALPHA = 0.9
CACHE_GB = 2.0
