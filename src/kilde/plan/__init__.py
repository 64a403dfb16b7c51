"""The collection plan (`kilde.yaml`): models, loading and checks."""

from kilde.plan.loading import PlanError, PlanProblem, load_plan, load_plan_text
from kilde.plan.models import Plan

__all__ = ["Plan", "PlanError", "PlanProblem", "load_plan", "load_plan_text"]
