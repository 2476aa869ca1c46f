"""OV-SAM's two training stages on Ray Train (DESIGN §5), and the tiny recipe behind the demo.

Stages and entry points (each also ``ovsam-ray train <cmd>`` and ``jobs/train_*.py``):

- SAM2CLIP distillation: ``distill.run_distill(DistillConfig)`` — frozen CLIP + trainable adapter,
  per-pixel MSE to SAM's image encoder (online, or features from ``distill.dump_teacher``).
- CLIP2SAM co-training: ``cotrain.run_cotrain(CotrainConfig)`` — decoder, FPN, RoI conv and label
  token train on a mixture of segmentation and image-level (ImageNet-22k style) shards.
- ``release.export_checkpoint(run, out)`` — a run's latest checkpoint in the released layout.
- ``tiny_recipe.run_tiny_recipe(work_dir)`` — ``ovsam_tiny`` from nothing on generated shapes: (0) a
  short contrastive tiny-CLIP pretraining (``clip_pretrain``), (1) no SAM teacher exists at this
  size, so the adapter trains together with (2) co-training; returns the exported weights.
- ``heldout.evaluate_weights`` — exported weights scored on held-out shards by the one scorer,
  ``evaluation.table1`` (box/point mIoU, accuracy over seen/unseen classes, box-fill baseline).

- ``recipes``: the paper's runs as named recipes (``--recipe sam2clip_vith_rn50x16``,
  ``clip2sam_coco_rn50x16``, ``clip2sam_lvis_rn50x16``), equal to the reference configs; epochs ->
  steps and the lr scaled by the global batch.

Layout, by what each module is about:

- what a run is: ``config`` (dataclasses), ``recipes`` (the paper's runs);
- the data: ``stream`` (shards -> rows through Ray Data), ``label_space`` (one training
  vocabulary), ``augment`` (LSJ), ``prompt_sampling``, ``batching`` (rows -> tensors);
- the networks: ``networks`` (the trainable models, built from released files; the SAM teacher);
- the optimisation: ``losses``, ``optim`` (AdamW, schedules), ``loop`` (the one loop; no Ray);
- the Ray glue: ``trainer`` (Ray Train, checkpoints), ``distill`` and ``cotrain`` (the stages);
- ``release`` (checkpoint -> released files); the tiny recipe: ``tiny_recipe``,
  ``clip_pretrain``, ``heldout``.
"""
