"""Insight derived from what was collected: segments, RFM, CLV, churn, sentiment, ..."""
