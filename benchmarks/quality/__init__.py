"""Quality on real data: the paper's trade-off (quality vs speed) measured with trained models.

``python -m cbart.benchmarks.quality`` trains, on ``../shared/data``, a Multi30k En->De base model, the
paper's compressed models at two latent sizes and their distilled variants, plus AG News
classifiers, then reports scores with confidence intervals against decode latency.
"""
