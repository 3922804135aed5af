"""Evaluation: classification by label likelihood, generation."""
