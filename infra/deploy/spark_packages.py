"""The Maven packages an Apache Spark Connect server needs for this lake, printed comma-separated.

Delta: the coordinate delta-spark's own `configure_spark_with_delta_pip` names for the installed
pyspark and delta-spark (io.delta:delta-spark_<spark major.minor>_2.13:<delta version>), so the
jar always matches the Python packages. S3: hadoop-aws of the same version as the Hadoop client
jars pyspark ships (its AWS SDK bundle comes with it as a dependency).
"""

from __future__ import annotations

import re
from pathlib import Path

import pyspark
from delta import configure_spark_with_delta_pip
from pyspark.sql import SparkSession


def delta_package() -> str:
    builder = configure_spark_with_delta_pip(SparkSession.builder)
    return builder._options["spark.jars.packages"]


def hadoop_version() -> str:
    jars = Path(pyspark.__file__).parent / "jars"
    for jar in jars.glob("hadoop-client-api-*.jar"):
        return re.fullmatch(r"hadoop-client-api-(.+)\.jar", jar.name).group(1)
    raise FileNotFoundError(f"no hadoop-client-api jar in {jars}: is the full pyspark installed?")


def packages() -> list[str]:
    return [delta_package(), f"org.apache.hadoop:hadoop-aws:{hadoop_version()}"]


if __name__ == "__main__":
    print(",".join(packages()))
