"""The reference embedders of phenoscale/baselines.py keep the embed() contract of the models."""

from __future__ import annotations

from embed_contract import IN_CHANS, EmbedContract
from phenoscale.baselines import QUANTILES, ImageStatistics

STATS = 2 + len(QUANTILES)  # mean, std and the quantiles of each channel


class TestImageStatisticsEmbed(EmbedContract):
    poolings = {None: STATS * IN_CHANS, "mean": STATS * IN_CHANS}
    rejected_poolings = ("max", "cls", "channelwise")
    per_channel = {None: STATS}  # each channel's statistics, in channel order

    def make_embedder(self):
        return ImageStatistics()
