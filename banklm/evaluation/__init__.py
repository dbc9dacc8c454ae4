"""Evaluation: batched generation, parsing with the task parsers, metrics, result files.

Import from the modules: ``banklm.evaluation.evaluate`` (score a model folder, an exported file or records),
``banklm.evaluation.generate`` (batched greedy generation in PyTorch), ``banklm.evaluation.metrics``. This
package file imports nothing, so a runtime can use ``generate`` without pulling in the evaluator.
Heavy imports (torch, transformers) happen only when generating.
"""
