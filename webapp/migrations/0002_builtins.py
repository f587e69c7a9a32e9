"""Built-in rows: the ``digits`` dataset and the four local targets (their settings come from the engine's
registry at run time; ``manage.py sync_targets`` copies them into the rows for display)."""

from django.db import migrations

BUILTIN_TARGETS = {
    "local-tvm": ("tvm", "TVM (LLVM) on this machine's CPU: compiled, optionally tuned kernels."),
    "local-ort": ("onnxruntime", "ONNX Runtime on this machine's CPU (float and int8 QDQ kernels)."),
    "local-torch": ("torch", "PyTorch eager on this machine's CPU."),
    "analytic": ("analytic", "No measurement: costs are MACs / BOPs / parameters / bytes only."),
}


def create(apps, schema_editor):
    Dataset = apps.get_model("webapp", "Dataset")
    Target = apps.get_model("webapp", "Target")
    Dataset.objects.get_or_create(
        owner=None,
        name="digits",
        defaults={
            "kind": "builtin",
            "status": "ready",
            "meta": {
                "source": "digits",
                "format": "digits",
                "num_samples": 1797,
                "num_test_samples": None,
                "fixed_test_split": False,
                "num_classes": 10,
                "class_names": [str(i) for i in range(10)],
                "class_counts": [178, 182, 177, 183, 181, 182, 181, 179, 174, 180],
                "input_shape": [1, 8, 8],
                "dtype": "uint8",
            },
        },
    )
    for name, (backend, description) in BUILTIN_TARGETS.items():
        Target.objects.get_or_create(
            name=name, defaults={"owner": None, "backend": backend, "description": description}
        )


def remove(apps, schema_editor):
    apps.get_model("webapp", "Dataset").objects.filter(owner=None, kind="builtin").delete()
    apps.get_model("webapp", "Target").objects.filter(owner=None, name__in=list(BUILTIN_TARGETS)).delete()


class Migration(migrations.Migration):
    dependencies = [("webapp", "0001_initial")]
    operations = [migrations.RunPython(create, remove)]
