"""pytorchexample: a Flower / PyTorch app."""

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr_distreal import LUT, make_droppable
from flwr_distreal.loop import DistrealRound
from flwr_distreal.resources import size_resources

from pytorchexample.task import Net, load_data
from pytorchexample.task import test as test_fn
from pytorchexample.task import train as train_fn

app = ClientApp()


@app.train()
def train(msg: Message, context: Context):
    """Train the model on local data."""
    model = make_droppable(Net(), torch.zeros(1, 1, 8, 8))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    device = torch.device("cpu")
    partition_id = context.node_config["partition-id"]
    num_partitions = context.node_config["num-partitions"]
    trainloader, _ = load_data(partition_id, num_partitions, context.run_config["batch-size"])
    sizing = size_resources(model, context.run_config["batch-size"], len(trainloader.dataset))
    resources = sizing.resource_model("timevarying", lam=2.0, seed=0)
    rnd = DistrealRound.from_config(model, LUT.uniform(model), msg.content["config"], resources=resources, device_id=partition_id)
    train_loss = train_fn(
        model,
        rnd.batches(trainloader),
        context.run_config["local-epochs"],
        msg.content["config"]["lr"],
        device,
    )
    metrics = {"train_loss": train_loss, **rnd.metrics(), "num-examples": rnd.num_examples}
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context):
    """Evaluate the model on local data."""
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    partition_id = context.node_config["partition-id"]
    num_partitions = context.node_config["num-partitions"]
    _, testloader = load_data(partition_id, num_partitions, context.run_config["batch-size"])
    eval_loss, eval_acc = test_fn(model, testloader, torch.device("cpu"))
    metrics = {"eval_loss": eval_loss, "eval_acc": eval_acc, "num-examples": len(testloader.dataset)}
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
