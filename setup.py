from setuptools import find_packages, setup

setup(
    name="geotaxi",
    version="1.0.0",
    description="UDP ingest server of taxi positions into Redis, for the open taxi API",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    packages=find_packages(exclude=["tests", "tests.*"]) + ["twisted.plugins"],
    package_data={"geotaxi": ["*.json", "*.lua"]},
    # The lower bounds are the versions the test suite ran with; older ones
    # were not tried. txredisapi is held to 1.6, whose RedisFactory
    # connection slots geotaxi drives directly.
    install_requires=[
        "Twisted[conch]>=26.10,<27",
        "txredisapi>=1.6.0,<1.7",
        "treq>=26.7,<27",
        "jsonschema>=4.26,<5",
        "fastjsonschema>=2.22,<3",
        "fluent-logger>=0.11,<0.12",
        "msgpack>=1.2,<2",
        "orjson>=3.13,<4",
    ],
    extras_require={
        "test": ["pytest>=9,<10"],
    },
    entry_points={
        "console_scripts": [
            "geotaxi = geotaxi.cli:main",
            "geotaxi-traffic = geotaxi.traffic:main",
            "geotaxi-netstat = geotaxi.netstat:main",
        ],
    },
)
