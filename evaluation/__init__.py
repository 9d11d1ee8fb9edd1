"""Segmentation metrics, folder evaluation, CHAOS and BTCV tools."""
